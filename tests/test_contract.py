"""lumireg.contract: its small functions, and the README's exit-code table is the contract's."""

import re
from pathlib import Path

import numpy as np
import pytest

from lumireg import contract

README = Path(__file__).resolve().parents[1] / "README.md"


def exit_code_rows() -> list[str]:
    """The README's exit-code table rows, written from :data:`lumireg.contract.EXIT_CODES`."""
    names = {
        value: name for name, value in vars(contract).items() if name.startswith("EXIT_") and isinstance(value, int)
    }
    return [f"| {code} | `{names[code]}` | {meaning} |" for code, meaning in contract.EXIT_CODES.items()]


def test_every_exit_code_has_one_name_and_a_meaning():
    constants = {
        name: value for name, value in vars(contract).items() if name.startswith("EXIT_") and isinstance(value, int)
    }
    assert sorted(constants.values()) == sorted(contract.EXIT_CODES)  # no code without a meaning, none twice
    assert all(contract.EXIT_CODES.values())


def test_readme_lists_exactly_the_contract_exit_codes():
    text = README.read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    expected = exit_code_rows()
    assert listed == expected, "README's exit-code table should read:\n" + "\n".join(expected)


@pytest.mark.parametrize("shape", [(160, 224, 192), (16,), (32, 48, 16)])
def test_size_rule_accepts_positive_multiples_of_16(shape):
    contract.check_size_multiple(shape)


@pytest.mark.parametrize("shape", [(160, 224, 190), (0, 16, 16), (-16, 16, 16), ()])
def test_size_rule_names_what_it_refuses(shape):
    with pytest.raises(ValueError, match="crop: spatial sizes must be positive multiples of 16"):
        contract.check_size_multiple(shape, "crop")


def test_uint8_conversion_rounds_half_to_even_and_saturates():
    unit = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.5, 254.5 / 255, 1.0, 7.0], np.float64)
    assert contract.intensities_to_uint8(unit).tolist() == [0, 0, 0, 2, 2, 128, 254, 255, 255]
    assert contract.intensities_to_uint8(unit).dtype == np.uint8


def test_uint8_conversion_inverts_the_network_scaling():
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 4, 8, 8)
    assert np.array_equal(contract.intensities_to_uint8(every.astype(np.float32) / 255), every)


@pytest.mark.parametrize(
    "fixed,moving,expected",
    [
        (
            "imagesVal/LUMIRMRI_3455_0000.nii.gz",
            "imagesVal/LUMIRMRI_3454_0000.nii.gz",
            ("3455_0000<--3454_0000", "disp_3455_3454"),
        ),
        ("LUMIRMRI_3455_0000.nii.gz", "LUMIRMRI_3455_0001.nii.gz", ("3455_0000<--3455_0001", "disp_3455_3455")),
        (
            "LUMIRMRI_3455_0001.nii.gz",
            "LUMIRMRI_3454_0000.nii.gz",
            ("3455_0001<--3454_0000", "disp_3455_0001_3454_0000"),
        ),
        ("fixed.nii.gz", "LUMIRMRI_3454_0000.nii.gz", None),
    ],
)
def test_lumir_names_follow_the_official_evaluator(fixed, moving, expected):
    assert contract.lumir_case_names(fixed, moving) == expected


def test_displacement_file_stem_without_modalities_is_lumirs_name():
    assert contract.displacement_file_stem("3455", "3454") == "disp_3455_3454"


def parameter_rows() -> list[str]:
    """The README's request-parameter table rows, written from :data:`lumireg.contract.PARAMETERS`."""
    return [
        f"| `{name}` | {p.kind.__name__} | {p.default} | {p.allowed().replace('|', chr(92) + '|')} | {p.meaning} |"
        for name, p in contract.PARAMETERS.items()
    ]


def test_readme_lists_exactly_the_contract_request_parameters():
    section = README.read_text().split("Request parameters (", 1)[1].split("\n\n", 2)[1]
    listed = [line for line in section.splitlines() if line.startswith("| `")]
    expected = parameter_rows()
    assert listed == expected, "README's request-parameter table should read:\n" + "\n".join(expected)


def test_request_parameters_fill_defaults_and_convert_numeric_strings():
    chosen = contract.request_parameters({"passes": "2", "similarity": "mi"})
    assert chosen == {**{name: p.default for name, p in contract.PARAMETERS.items()}, "passes": 2, "similarity": "mi"}
    assert chosen["refine"] == 0 and chosen["align"] == "none"


@pytest.mark.parametrize(
    "given, message",
    [
        ({"passes": 0}, r"'passes' must be in 1\.\.4, got 0"),
        ({"refine": contract.MAX_REFINE_STEPS + 1}, rf"'refine' must be in 0\.\.{contract.MAX_REFINE_STEPS}"),
        ({"refine": 2.5}, "'refine' must be int, got 2.5"),
        ({"refine": True}, "'refine' must be int"),
        ({"similarity": "ssd"}, r"'similarity' must be one of ncc \| mi, got 'ssd'"),
        ({"similarity": ""}, "'similarity' must be one of"),
        ({"similarity": 1}, "'similarity' must be one of"),
        ({"similarity": "x" * 10_000}, r"got 'x{39}\.\.\.$"),  # a huge value is not echoed whole
        ({"steps": 3}, r"unknown request parameter\(s\) \['steps'\]"),
    ],
)
def test_request_parameters_refuse_what_the_contract_does_not_allow(given, message):
    with pytest.raises(ValueError, match=message):
        contract.request_parameters(given)
