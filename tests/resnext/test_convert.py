"""The .pth -> numpy converter: fixture values, refusal of foreign code, CLI, torch round trip."""
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from resnext.convert import ConvertError, load_pth, load_weights, main

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "tiny_state_dict.pth")
EXPECTED = os.path.join(FIXTURES, "tiny_state_dict_expected.npz")
MALICIOUS = os.path.join(FIXTURES, "malicious.pth")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _assert_same_arrays(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].shape == expected[name].shape, name
        assert np.array_equal(got[name], expected[name]), name


def test_fixture_converts_to_the_values_torch_saved():
    with np.load(EXPECTED) as npz:
        expected = {name: npz[name] for name in npz.files}
    got = load_weights(TINY)
    _assert_same_arrays(got, expected)
    assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.num_batches_tracked"].shape == ()
    assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())
    assert got["extra.transposed"].shape == (6, 4)  # strided and offset views were gathered


def test_malicious_pickle_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned_by_pickle.txt"
    with pytest.raises(ConvertError, match=r"refusing to load 'os\.system'") as err:
        load_pth(MALICIOUS)
    assert "\n" not in str(err.value)
    assert not marker.exists()

    # Control: the payload is live, so the assertion above could have failed.
    with zipfile.ZipFile(MALICIOUS) as z:
        pickle.loads(z.read("malicious/data.pkl"))  # noqa: S301 - on purpose, in tmp_path
    assert marker.exists()


def test_cli_writes_npz_and_reports_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "resnext.convert", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)

    done = run(TINY, "out.npz")
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as got, np.load(EXPECTED) as expected:
        _assert_same_arrays({k: got[k] for k in got.files}, {k: expected[k] for k in expected.files})

    for args, message in [((MALICIOUS, "x.npz"), "refusing"),
                          ((str(tmp_path / "missing.pth"), "x.npz"), "not found")]:
        failed = run(*args)
        assert failed.returncode != 0
        assert message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "pwned_by_pickle.txt").exists()


def test_damaged_files_are_convert_errors(tmp_path):
    not_zip = tmp_path / "old.pth"
    not_zip.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, as torch < 1.6 wrote
    with pytest.raises(ConvertError, match="not a PyTorch zip"):
        load_pth(not_zip)
    # Drop one storage record from the fixture.
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(TINY) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/0"):
                dst.writestr(item, src.read(item))
    with pytest.raises(ConvertError, match="missing"):
        load_pth(broken)


def test_tensor_reading_past_its_storage_is_refused(tmp_path):
    # Hand-written pickle: a 1-element float storage viewed as 4 elements.
    payload = (b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02"
               b"((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000"
               b"X\x03\x00\x00\x00cpuK\x01tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n"
               b")Rtq\x05Rq\x06s.")
    path = tmp_path / "evil_view.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil_view/data.pkl", payload)
        z.writestr("evil_view/data/0", np.float32(1).tobytes())
    with pytest.raises(ConvertError, match="reads past its storage"):
        load_pth(path)


def test_npz_round_trip(tmp_path):
    main([TINY, str(tmp_path / "w.npz")])
    _assert_same_arrays(load_weights(tmp_path / "w.npz"), load_weights(TINY))
    with pytest.raises(ConvertError, match="not found"):
        load_weights(tmp_path / "nope.npz")


def test_random_state_dict_saved_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, 3, generator=g)
    sd = {"permuted": base.permute(2, 0, 1), "sliced": base[1:4, ::3, 1],
          "long": torch.randint(-5, 5, (4, 3), generator=g).t(), "double": base.double()[2],
          "nested.bf16": torch.randn(6, generator=g).bfloat16()[::2]}
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "ck.pth")  # a training checkpoint
    got = load_weights(tmp_path / "ck.pth")
    for name, t in sd.items():
        ref = (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy()
        assert got[name].dtype == ref.dtype and np.array_equal(got[name], ref), name
