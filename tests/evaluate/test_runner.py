"""``lumireg evaluate`` end to end on a tiny fake LUMIR folder, and its errors."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lumireg.cli import main
from lumireg.contract import EXIT_USAGE
from lumireg.evaluate import EvaluationError, evaluate

SHAPE = (12, 14, 16)
SUBJECTS = ("3454", "3455", "3456")
K = 2  # the translation of the first pair, voxels along axis 0
# (label, corner, side): cubes 3 voxels clear of every face
CUBES = [(1, (3, 3, 3), 4), (2, (4, 8, 9), 5)]
LANDMARKS = {1: (4, 5, 6), 2: (8, 10, 4), 3: (9, 6, 12)}


def image(subject: str) -> str:
    return f"./imagesVal/LUMIRMRI_{subject}_0000.nii.gz"


def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def build_dataset(root):
    """GT_DIR with the same cubes and landmarks in every subject; DISP_DIR with two fields."""
    gt, disp_dir = root / "gt", root / "disp"
    labels, landmarks = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for label, corner, side in CUBES:
        labels[tuple(slice(c, c + side) for c in corner)] = label
    for label, (i, j, k) in LANDMARKS.items():
        landmarks[i, j, k] = label
    brain = np.zeros(SHAPE, np.uint8)
    brain[2:-2, 2:-2, 2:-2] = 100
    for s in SUBJECTS:
        name = f"LUMIRMRI_{s}_0000.nii.gz"
        save(gt / "imagesVal" / name, brain)
        save(gt / "labelsVal" / name, labels)
        save(gt / "landmarksVal" / name, landmarks)
    shifted = np.zeros(SHAPE + (3,), np.float32)
    shifted[..., 0] = K
    save(disp_dir / f"disp_{SUBJECTS[1]}_{SUBJECTS[0]}.nii.gz", shifted)
    # the second field: identity in float16 (so .npz, as NIfTI has no float16), channels first
    np.savez_compressed(disp_dir / f"disp_{SUBJECTS[2]}_{SUBJECTS[1]}.npz", np.zeros((3,) + SHAPE, np.float16))
    return gt, disp_dir


def write_configs(root, segmentation=None, landmark=None):
    seg = {
        "name": "LUMIR",
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": image(SUBJECTS[1]), "moving": image(SUBJECTS[0])}],
        "evaluation_methods": [
            {"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
            {"name": "DSC", "metric": "dice", "labels": [0, 1, 2, 7]},
            {"name": "HD95", "metric": "hd95", "labels": [1, 2, 7]},
        ],
        "masked_evaluation": False,
    }
    lm = {
        "name": "LUMIR",
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [
            {"fixed": image(SUBJECTS[1]), "moving": image(SUBJECTS[0])},
            {"fixed": image(SUBJECTS[2]), "moving": image(SUBJECTS[1])},
        ],
        "evaluation_methods": [
            {"name": "Non-diffeomorphic Volumes", "metric": "ndv"},
            {"name": "TRE_lm", "metric": "tre", "dest": "landmarks"},
            {"name": "SDlogJ", "metric": "sdlogj"},
        ],
    }
    paths = []
    for name, config in (("seg.json", segmentation or seg), ("lm.json", landmark or lm)):
        (root / name).write_text(config if isinstance(config, str) else json.dumps(config))
        paths.append(root / name)
    return paths


@pytest.fixture
def dataset(tmp_path):
    gt, disp = build_dataset(tmp_path)
    return tmp_path, gt, disp, write_configs(tmp_path)


def run_cli(gt, disp, configs, out) -> int:
    argv = ["evaluate", "-i", str(disp), "-d", str(gt), "-o", str(out), "-q"]
    for c in configs:
        argv += ["-c", str(c)]
    return main(argv)


def test_evaluate_cli_scores_a_translation_end_to_end(dataset, capsys):
    root, gt, disp, configs = dataset
    assert run_cli(gt, disp, configs, root / "out" / "metrics.json") == 0
    report = json.loads((root / "out" / "metrics.json").read_text())
    first, second = f"{SUBJECTS[1]}_0000<--{SUBJECTS[0]}_0000", f"{SUBJECTS[2]}_0000<--{SUBJECTS[1]}_0000"
    assert list(report["cases"]) == [first, second]
    case = report["cases"][first]
    # the first case holds the methods of both configs
    assert set(case) == {"Non-diffeomorphic Volumes", "DSC", "HD95", "TRE_lm", "SDlogJ"}

    # cubes shifted by K along axis 0: Dice (side - K) / side; background by counting; label 7 absent -> null
    volume, cubes = np.prod(SHAPE), sum(side**3 for _, _, side in CUBES)
    union = sum(2 * side**3 - side**2 * (side - K) for _, _, side in CUBES)
    background = 2 * (volume - union) / (2 * (volume - cubes))
    expected = {"0": background, "1": (4 - K) / 4, "2": (5 - K) / 5, "7": None}
    assert case["DSC"]["detailed"].keys() == expected.keys()
    for label, value in expected.items():
        assert case["DSC"]["detailed"][label] == (None if value is None else pytest.approx(value))
    assert case["DSC"]["mean"] == pytest.approx(np.mean([background, (4 - K) / 4, (5 - K) / 5]))
    assert case["HD95"] == {"mean": K, "detailed": {"1": K, "2": K, "7": None}}
    assert case["TRE_lm"]["mean"] == pytest.approx(K)
    assert case["TRE_lm"]["detailed"] == {str(v): pytest.approx(K) for v in LANDMARKS}
    assert case["Non-diffeomorphic Volumes"] == {"mean": 0.0, "detailed": 0.0}
    assert case["SDlogJ"] == {"mean": 0.0, "detailed": 0.0}

    identity = report["cases"][second]
    assert identity["TRE_lm"]["mean"] == 0.0 and identity["Non-diffeomorphic Volumes"]["mean"] == 0.0

    # aggregates over the cases holding each method: TRE over [K, 0] -> mean K/2, std K/2, 30 % quantile 0.3 K
    assert report["aggregates"]["TRE_lm"] == {
        "mean": pytest.approx(K / 2),
        "std": pytest.approx(K / 2),
        "30": pytest.approx(0.3 * K),
    }
    assert report["aggregates"]["HD95"] == {"mean": K, "std": 0.0, "30": K}
    assert report["name"] == "LUMIR"
    assert "TRE_lm" in capsys.readouterr().out


def test_nan_aggregates_are_written_as_null(dataset):
    root, gt, disp, _ = dataset
    only_absent = {
        "name": "absent",
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": image(SUBJECTS[1]), "moving": image(SUBJECTS[0])}],
        "evaluation_methods": [{"name": "DSC", "metric": "dice", "labels": [7]}],
    }
    config = root / "absent.json"
    config.write_text(json.dumps(only_absent))
    report = evaluate(disp, gt, [config], progress=False)
    assert np.isnan(report["aggregates"]["DSC"]["mean"])
    assert run_cli(gt, disp, [config], root / "m.json") == 0
    written = json.loads((root / "m.json").read_text())
    assert written["aggregates"]["DSC"] == {"mean": None, "std": None, "30": None}


def test_missing_displacement_file_is_named(dataset, capsys):
    root, gt, disp, configs = dataset
    (disp / f"disp_{SUBJECTS[2]}_{SUBJECTS[1]}.npz").unlink()
    missing = disp / f"disp_{SUBJECTS[2]}_{SUBJECTS[1]}.nii.gz"
    assert run_cli(gt, disp, configs, root / "m.json") == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(missing) in err and "missing" in err
    assert not (root / "m.json").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".npz"])
def test_wrong_field_shape_is_named(dataset, capsys, suffix):
    root, gt, disp, configs = dataset
    wrong = disp / f"disp_{SUBJECTS[1]}_{SUBJECTS[0]}{suffix}"
    if suffix == ".npz":
        np.savez(wrong, np.zeros((12, 14, 15, 3), np.float16))
    else:
        save(wrong, np.zeros((12, 14, 15, 3), np.float32))
    assert run_cli(gt, disp, configs, root / "m.json") == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(wrong) in err and "(12, 14, 15, 3)" in err and "(12, 14, 16, 3)" in err


@pytest.mark.parametrize("folder", ["labelsVal", "landmarksVal", "imagesVal"])
def test_missing_ground_truth_file_is_named(dataset, folder):
    root, gt, disp, configs = dataset
    missing = gt / folder / f"LUMIRMRI_{SUBJECTS[0]}_0000.nii.gz"
    missing.unlink()
    with pytest.raises(EvaluationError, match="ground-truth file missing") as raised:
        evaluate(disp, gt, configs, progress=False)
    assert str(missing) in str(raised.value)


BROKEN = {
    "not JSON": "{not json",
    "no pairs": {"name": "x", "expected_shape": [*SHAPE, 3], "evaluation_methods": [{"name": "n", "metric": "ndv"}]},
    "bad shape": {"expected_shape": [12, 14], "eval_pairs": [], "evaluation_methods": []},
    "unknown metric": {
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": image("3455"), "moving": image("3454")}],
        "evaluation_methods": [{"name": "m", "metric": "mse"}],
    },
    "dice without labels": {
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": image("3455"), "moving": image("3454")}],
        "evaluation_methods": [{"name": "DSC", "metric": "dice"}],
    },
    "tre without dest": {
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": image("3455"), "moving": image("3454")}],
        "evaluation_methods": [{"name": "TRE", "metric": "tre"}],
    },
    "bad image name": {
        "expected_shape": [*SHAPE, 3],
        "eval_pairs": [{"fixed": "a.nii.gz", "moving": image("3454")}],
        "evaluation_methods": [{"name": "n", "metric": "ndv"}],
    },
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_malformed_config_is_named(tmp_path, broken, capsys):
    gt, disp = build_dataset(tmp_path)
    configs = write_configs(tmp_path, segmentation=BROKEN[broken])
    assert run_cli(gt, disp, configs, tmp_path / "m.json") == EXIT_USAGE
    assert f"lumireg evaluate: {configs[0]}:" in capsys.readouterr().err


def test_missing_config_is_named(tmp_path, capsys):
    assert run_cli(tmp_path, tmp_path, [tmp_path / "nope.json"], tmp_path / "m.json") == EXIT_USAGE
    assert str(tmp_path / "nope.json") in capsys.readouterr().err


def test_cli_parses_evaluate_without_importing_numerics(tmp_path):
    code = (
        "import sys, lumireg.cli\n"
        "lumireg.cli.build_parser().parse_args(['evaluate', '-i', 'a', '-d', 'b', '-c', 'c1', '-c', 'c2'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'scipy', 'nibabel', 'numpy'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
