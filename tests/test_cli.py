"""The kbitc command line: --help, --version and the report on the bundled example weights."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import kbitc
from kbitc.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama_linears.safetensors"


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "report" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and kbitc.__version__ in result.output
    result = runner.invoke(main, ["report", "--help"])
    assert result.exit_code == 0 and "--blocksize" in result.output


# SQNR floors: measured minimum over the 7 layers (NF4 17.1, FP4 12.8, int8 33.6 dB) minus 1 dB
@pytest.mark.parametrize("scheme,bits,min_db", [("--nf4", 4.0, 16.1), ("--fp4", 4.0, 11.8), ("--int8", 8.0, 32.6)])
def test_report_on_example_weights(scheme, bits, min_db):
    result = CliRunner().invoke(main, ["report", scheme, "--json", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 7
    for row in rows:
        assert bits < row["bits_per_param"] < bits + 0.5
        assert row["sqnr_db"] > min_db


def test_report_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    result = CliRunner().invoke(main, ["report", str(bad)])
    assert result.exit_code != 0 and "expected a readable .safetensors file" in result.output
    nan = tmp_path / "nan.safetensors"
    save_file({"w": torch.full((4, 64), float("nan"))}, nan)
    result = CliRunner().invoke(main, ["report", str(nan)])
    assert result.exit_code != 0 and "NaN or Inf" in result.output
    result = CliRunner().invoke(main, ["report", "--blocksize", "100", str(EXAMPLE)])
    assert result.exit_code != 0 and "power of two" in result.output
