"""The shipped defaults travel with the package: a wheel installed outside the repository finds them."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_installed_elsewhere_loads_the_shipped_orpheus_config(tmp_path):
    """Build the wheel, unpack it away from the repository, and load the config from there: the YAML's values."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        timeout=240,
    )
    wheel = next((tmp_path / "dist").glob("pipecat_orpheus-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = site / "pipecat_orpheus" / "orpheus_config.yaml"
    assert not shipped.is_symlink() and shipped.read_text() == (ROOT / "orpheus_config.yaml").read_text()
    probe = (
        "import pipecat_orpheus.config as c; cfg = c.load_config(environ={}); "
        "print(c.DEFAULT_CONFIG_PATH); print(cfg.engine.prefill_tokens_while_decoding, cfg.codec.step_margin)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    path, values = out.stdout.split("\n")[:2]
    assert Path(path).is_relative_to(site)
    import yaml

    data = yaml.safe_load((ROOT / "orpheus_config.yaml").read_text())
    assert values == f"{data['engine']['prefill_tokens_while_decoding']} {data['codec']['step_margin']}"
