"""resnext: train and evaluate ResNeXt50_32x4d with minitorch_gx."""
