"""Independent benchmark pairs: pure functions of the index, diffeomorphic, LUMIR-like, nothing shared with training."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumireg.benchmarks.independent_pairs import LABELS, IndependentConfig, Level, independent_pair, random_field
from lumireg.evaluate import as_channels_last, jacobian_determinant, ndv_percent

SHAPE = (32, 40, 36)  # the canvas's field of view at 5 mm


@pytest.fixture(scope="module")
def pair():
    return independent_pair(3, SHAPE, fields=True)


def test_a_pair_is_a_pure_function_of_its_index(pair):
    again = independent_pair(3, SHAPE, fields=True)
    assert set(again) == set(pair)
    for key in ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_disp", "moving_disp"):
        np.testing.assert_array_equal(again[key], pair[key], err_msg=key)
    assert again["seed"] == pair["seed"] == 3


def test_different_indices_and_the_two_images_of_a_pair_differ(pair):
    other = independent_pair(4, SHAPE, fields=True)
    for key in ("fixed", "moving", "fixed_labels", "fixed_disp"):
        assert not np.array_equal(other[key], pair[key]), key
    # fixed and moving have their own fields and their own intensities
    assert np.abs(pair["fixed_disp"] - pair["moving_disp"]).max() > 1.0
    assert not np.array_equal(pair["fixed"], pair["moving"])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_fields_are_diffeomorphic_and_move_the_brain(index):
    # full field of view at 4 mm (40 x 56 x 48): every level's folds would show at this sampling
    field = random_field((40, 56, 48), np.random.default_rng(index))
    assert field.shape == (3, 40, 56, 48) and field.dtype == np.float32
    disp = as_channels_last(field)
    assert jacobian_determinant(disp).min() > 0.2 and ndv_percent(disp) == 0.0
    assert np.linalg.norm(field * 4, axis=0).max() > 4.0  # mm: a real deformation, not the identity


def test_the_injectivity_bound_is_what_keeps_fields_unfolded():
    # the same draws without the bound fold: the diffeomorphism check above can fail
    rough = IndependentConfig(levels=(Level((16.0, 16.0), (12.0, 12.0)),))
    rng = np.random.default_rng(0)
    folded = as_channels_last(random_field((40, 56, 48), rng, IndependentConfig(levels=rough.levels, injectivity=None)))
    assert jacobian_determinant(folded).min() < 0 and ndv_percent(folded) > 0
    bounded = as_channels_last(random_field((40, 56, 48), np.random.default_rng(0), rough))
    assert jacobian_determinant(bounded).min() > 0 and ndv_percent(bounded) == 0.0


def test_images_are_lumir_intensities_and_labels_are_the_54_parcels(pair):
    assert len(LABELS) == 54 and sorted(LABELS) == list(range(1, 55))
    assert LABELS[1] == "csf_left_posterior_inferior" and LABELS[54] == "wm_right_anterior_superior"
    for name in ("fixed", "moving"):
        image, labels = pair[name], pair[f"{name}_labels"]
        assert image.shape == labels.shape == (1, *SHAPE)
        assert image.dtype == np.float32 and labels.dtype == np.int32
        assert image.min() == 0.0 and image.max() == 1.0
        np.testing.assert_array_equal(np.rint(image * 255) / np.float32(255), image)
        # every label appears in both images; the brain is where the image is
        assert set(np.unique(labels)) == {0, *LABELS}
        assert (image[labels > 0] > 0).mean() > 0.99 and (labels[image > 0] > 0).mean() > 0.8


def test_t1_order_of_the_tissues(pair):
    for name in ("fixed", "moving"):
        image, tissue = pair[name][0], (pair[f"{name}_labels"][0] - 1) // 18
        csf, gm, wm = (np.median(image[(pair[f"{name}_labels"][0] > 0) & (tissue == t)]) for t in range(3))
        assert csf < gm < wm


def test_a_cross_contrast_pair_keeps_its_geometry_and_reverses_the_tissue_order(pair):
    crossed = independent_pair(3, SHAPE, fields=True, contrasts=("t1", "t2"))
    for key in ("fixed", "fixed_labels", "moving_labels", "fixed_disp", "moving_disp"):
        np.testing.assert_array_equal(crossed[key], pair[key])  # only the moving image's tissue levels change
    labels = crossed["moving_labels"][0]
    tissue = (labels - 1) // 18
    csf, gm, wm = (np.median(crossed["moving"][0][(labels > 0) & (tissue == t)]) for t in range(3))
    assert csf > gm > wm
    with pytest.raises(ValueError, match="contrasts must be two of"):
        independent_pair(3, SHAPE, contrasts=("t1", "flair"))


def test_the_module_imports_neither_torch_nor_the_training_generator_nor_the_kernels():
    code = (
        "import sys\n"
        "from lumireg.benchmarks.independent_pairs import independent_pair\n"
        "independent_pair(0, (16, 20, 18))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'lumireg.kernels',"
        " 'lumireg.train.', 'lumireg.network'))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['lumireg.train.canvas']"


def test_nothing_in_train_imports_the_independent_generator():
    train = Path(__file__).resolve().parents[2] / "train"
    sources = list(train.glob("*.py"))
    assert sources
    assert not [p.name for p in sources if "independent_pairs" in p.read_text()]


def test_shape_and_index_are_checked():
    with pytest.raises(ValueError, match="index"):
        independent_pair(-1, SHAPE)
    with pytest.raises(ValueError, match="shape"):
        independent_pair(0, (32, 40))
