"""Every example script and the notebook run with tiny settings (numpy's `test/test_examples.py`
habit): they must exit 0 and write their figures. Scripts run in a subprocess each, the notebook
through nbclient, all with `NUMPYRO_MLMC_TINY=1` and on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> files it must write into --out
SCRIPTS = {
    "quickstart.py": ["quickstart.png", "quickstart_mlmc.png"],
    "inpainting_uncertainty.py": ["inpainting_uncertainty.png", "inpainting_samples.png"],
    "poisson_deblurring_dps.py": ["poisson_deblurring.png"],
    "custom_network_prior.py": [
        "custom_network_loss.png",
        "custom_network_samples.png",
        "custom_network_denoising.png",
    ],
    "mlmc_diagnostics.py": ["mlmc_test.png", "mlmc_run.png", "mlmc_levels.csv"],
}


def _env():
    env = dict(os.environ)
    env.update(NUMPYRO_MLMC_TINY="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    return env


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SCRIPTS), "add new examples to SCRIPTS (and old ones out)"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script(script, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--tiny", "--out", str(out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in SCRIPTS[script]:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"{script} did not write {name}"


def test_tour_notebook(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
    assert all(
        not cell.get("outputs") and cell.get("execution_count") is None
        for cell in notebook.cells
        if cell.cell_type == "code"
    ), "commit the notebook without outputs"
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND")  # the kernel's inline backend shows the figures
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 3, "the notebook should show its figures"
