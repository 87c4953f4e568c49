"""eval.py scores only what it can trust: a constant model scores chance, an
overflowing one 0% (and says how many rows were non-finite), a checkpoint with
NaN or inf arrays is refused, a .pth the converter refuses is one line, and
in a folder a bad checkpoint is reported and skipped while the others are scored."""
import os
import pathlib
import re
import subprocess
import sys

import numpy
import pytest

from resnext.evaluate import main as eval_main
from resnext.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MALICIOUS = os.path.join(ROOT, "tests", "resnext", "fixtures", "malicious.pth")
EVAL = ["--num_workers", "0", "--device_target", "CPU", "--per_batch_size", "5"]
CHANCE = r"top1_correct=4, tot=12, acc=33\.33%\(TOP1\)"   # 3 balanced classes, 4 images each


def write_checkpoint(path, change=None, weights_only=False):
    """A resnext_mini checkpoint for 3 classes at 32x32, written straight with
    numpy (the checkpoint format, with no check on the values), after
    ``change(arrays)`` edits the name -> array dict of the model."""
    model = build_model("resnext_mini", 3, seed=0)
    arrays = {k: numpy.array(v) for k, v in model.state_dict().items()}
    if change is not None:
        change(arrays)
    with open(path, "wb") as f:
        if weights_only:   # a plain state_dict .npz, as python -m resnext.convert writes
            numpy.savez(f, **arrays)
        else:
            meta = numpy.frombuffer(b'{"arch": "resnext_mini", "image_size": 32}', numpy.uint8)
            numpy.savez(f, meta=meta, **{f"model/{k}": v for k, v in arrays.items()})
    return str(path)


def zero_fc(arrays):
    arrays["fc.weight"][...] = 0
    arrays["fc.bias"][...] = 0


def nan_fc_bias(arrays):
    arrays["fc.bias"][1] = numpy.nan


def run_script(cwd, *argv):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def evaluate(data, path, capsys, *extra):
    capsys.readouterr()
    code = eval_main(["--data_path", str(data / "val"), "--checkpoint_file_path", str(path)]
                     + EVAL + list(extra))
    return code, capsys.readouterr().out


# -- case 1: ties and non-finite logits -----------------------------------------------------
def test_a_constant_model_scores_chance_not_100_percent(data, tmp_path, capsys):
    path = write_checkpoint(tmp_path / "0-1_1.ckpt", zero_fc)
    code, out = evaluate(data, path, capsys)
    assert code == 0
    assert re.search(CHANCE, out), out                      # was 12 of 12
    assert re.search(r"top5_correct=12, tot=12", out)       # K = 3: top-3 holds every class
    assert "non-finite" not in out


def test_a_zero_weights_file_scores_chance(data, tmp_path, capsys):
    path = write_checkpoint(tmp_path / "w.npz", zero_fc, weights_only=True)
    code, out = evaluate(data, path, capsys, "--arch", "resnext_mini", "--image_size", "32")
    assert code == 0 and re.search(CHANCE, out), out


def test_logits_that_overflow_to_inf_score_zero_and_are_counted(data, tmp_path, capsys):
    def huge_fc(arrays):   # finite weights, but x @ W overflows float32 to inf
        arrays["fc.weight"][...] = 3e38
        arrays["fc.bias"][...] = 0

    path = write_checkpoint(tmp_path / "0-1_1.ckpt", huge_fc)
    code, out = evaluate(data, path, capsys)
    assert code == 0
    assert re.search(r"top1_correct=0, tot=12, acc=0\.00%\(TOP1\)", out), out   # was 100%
    assert re.search(r"top5_correct=0, tot=12, acc=0\.00%\(TOP5\)", out), out
    assert "12 of 12 rows had non-finite logits and were scored wrong" in out


def test_evaluate_returns_the_non_finite_row_count(data, tmp_path):
    from resnext.dataset import ImageFolder
    from resnext.evaluate import evaluate as score
    from resnext.loader import Loader
    from resnext.runtime import SingleProcess

    model = build_model("resnext_mini", 3, seed=0)
    loader = Loader(ImageFolder(data / "val"), 5, train=False, image_size=32, num_workers=0)
    finite = score(model, loader, numpy, SingleProcess())
    assert finite.total == 12 and finite.nonfinite == 0
    model.fc.weight.data[...] = 3e38
    broken = score(model, loader, numpy, SingleProcess())
    assert (broken.top1, broken.top5, broken.total, broken.nonfinite) == (0, 0, 12, 12)


# -- case 2: checkpoints with non-finite arrays are refused -----------------------------------
@pytest.mark.parametrize("name,weights_only", [("0-1_1.ckpt", False), ("w.npz", True)])
def test_a_checkpoint_with_nan_arrays_is_refused_in_one_line(data, tmp_path, name, weights_only):
    def two_bad(arrays):
        nan_fc_bias(arrays)
        arrays["conv1.weight"][0, 0, 0, 0] = numpy.inf

    path = write_checkpoint(tmp_path / name, two_bad, weights_only)
    total = len(build_model("resnext_mini", 3).state_dict())
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", path, "--arch", "resnext_mini", "--image_size", "32",
                   *EVAL)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {path}: 2 of {total} arrays hold NaN or inf values (e.g. 'conv1.weight'): "
        f"refusing to score it"], r.stderr
    assert "top1_correct" not in r.stdout                   # was scored (0% top-1 or worse)


# -- case 12: a .pth that is missing or refused by the converter ------------------------------
def test_eval_of_a_malicious_pth_is_one_line_and_runs_nothing(data, tmp_path):
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", MALICIOUS, *EVAL)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr                        # was a ConvertError traceback
    assert lines[0].startswith(f"error: {MALICIOUS}: refusing to load 'os.system'"), lines
    assert not (tmp_path / "pwned_by_pickle.txt").exists()


def test_eval_of_a_missing_pth_is_one_line(data, tmp_path):
    missing = str(tmp_path / "nope.pth")
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", missing, *EVAL)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --checkpoint_file_path {missing}: no such file or folder"]


def damaged_pth(tmp_path):
    """The converter's tiny fixture with one byte of its pickle flipped (a bad CRC)."""
    import zipfile
    src = os.path.join(ROOT, "tests", "resnext", "fixtures", "tiny_state_dict.pth")
    data = bytearray(pathlib.Path(src).read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    start = data.index(info.filename.encode(), info.header_offset) + len(info.filename)
    data[start + len(info.extra) + 20] ^= 0xFF      # inside the stored (uncompressed) pickle
    path = tmp_path / "damaged.pth"
    path.write_bytes(bytes(data))
    return str(path)


def test_eval_of_a_damaged_pth_is_one_line(data, tmp_path):
    path = damaged_pth(tmp_path)
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", path, *EVAL)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: damaged"), r.stderr


@pytest.mark.parametrize("weights", ["missing", "malicious"])
def test_train_warm_start_from_a_bad_pth_is_one_line(data, tmp_path, weights):
    path = str(tmp_path / "nope.pth") if weights == "missing" else MALICIOUS
    r = run_script(tmp_path, os.path.join(ROOT, "train.py"), "--data_path", str(data / "train"),
                   "--output_path", str(tmp_path / "out"), "--checkpoint_file_path", path,
                   "--arch", "resnext_mini", "--image_size", "32", "--per_batch_size", "4",
                   "--num_workers", "0", "--device_target", "CPU", "--max_epoch", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path in lines[0], r.stderr
    assert not (tmp_path / "pwned_by_pickle.txt").exists()


# -- case 17: in a folder, a bad checkpoint is reported and skipped ---------------------------
def test_a_folder_with_bad_checkpoints_scores_the_others_and_fails_at_the_end(data, tmp_path):
    folder = tmp_path / "ckpt_0"
    folder.mkdir()
    garbage = folder / "0-3_1.ckpt"                          # newest: evaluated first
    garbage.write_bytes(b"not a zip file at all")
    good = write_checkpoint(folder / "0-2_1.ckpt", zero_fc)
    nan = write_checkpoint(folder / "0-1_1.ckpt", nan_fc_bias)
    total = len(build_model("resnext_mini", 3).state_dict())
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", str(folder), *EVAL)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("error: ") and str(garbage) in lines[0] \
        and lines[0].endswith("; skipped"), lines            # was the end of the evaluation
    assert lines[1] == (f"error: {nan}: 1 of {total} arrays hold NaN or inf values "
                        f"(e.g. 'fc.bias'): refusing to score it; skipped"), lines
    assert re.findall(r"evaluating (.*)", r.stdout) == [good]   # the good one is still scored
    assert re.search(CHANCE, r.stdout), r.stdout
    assert "summary: 1 checkpoint(s) on 12 images" in r.stdout
    assert "2 checkpoint(s) could not be scored" in r.stdout


def test_a_folder_where_every_checkpoint_is_bad_fails(data, tmp_path):
    folder = tmp_path / "ckpt_0"
    folder.mkdir()
    write_checkpoint(folder / "0-2_1.ckpt", nan_fc_bias)
    (folder / "0-1_1.ckpt").write_bytes(b"garbage")
    r = run_script(tmp_path, os.path.join(ROOT, "eval.py"), "--data_path", str(data / "val"),
                   "--checkpoint_file_path", str(folder), *EVAL)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr
    assert "Traceback" not in r.stderr and "top1_correct" not in r.stdout
    assert "no checkpoint could be scored" in r.stdout
