"""Regenerate the README's pictures from a real small sweep: docs/report.png and docs/mlflow-runs.png.

    python -m docs.screenshots        # from the repository root, with the dev extras (make install-dev)

It runs `mnist-sweep run sweeps/fcn.toml` shrunk (RUN_ARGS) in a temporary folder, prints what the run printed
(the README's "What a run prints" is a copy of it), opens report.html in Debian's headless Chromium
(`apt-get install chromium`, as .ci/run does), then serves the study with `mnist-sweep ui` and photographs its
runs table with the study run expanded. A minute or two on 2 cores; nothing outside 127.0.0.1 is reached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from tests.browser import EXPAND, ROWS, chromium_page, free_port, open_runs_table, serving
from tests.conftest import CLI, DEFAULT_SWEEP, REPO, SHARED_MNIST, cli_environment

DOCS = REPO / "docs"
RUN_ARGS = ["--trials", "6", "--epochs", "3", "--set", "data.train_limit=2000"]
COLUMNS = ["final_val_accuracy", "activation", "batch_size", "optimizer"]  # what a user compares trials by
MAX_BYTES = 300_000  # the README stays light to clone and to load


def main() -> None:
    data = Path(os.environ.get("MNIST_SWEEP_DATA") or SHARED_MNIST)
    with tempfile.TemporaryDirectory(prefix="mnist-sweep-docs-") as temporary:
        folder = Path(temporary)
        (folder / "sweeps").mkdir()
        shutil.copy(DEFAULT_SWEEP, folder / "sweeps" / "fcn.toml")  # the commands read as the README's
        command = [*CLI, "run", "sweeps/fcn.toml", *RUN_ARGS]
        print("$ mnist-sweep", *command[len(CLI) :])
        done = subprocess.run(command, cwd=folder, env=cli_environment(data), capture_output=True, text=True)
        print(done.stdout, end="")
        if done.returncode != 0:
            sys.exit(f"the sweep failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        photograph_report(folder / "reports" / "fcn" / "report.html", DOCS / "report.png")
        photograph_runs_table(folder, data, DOCS / "mlflow-runs.png")


def photograph_report(report: Path, png: Path) -> None:
    """The top of report.html: the test accuracy, the chosen trial and the test confusion matrix."""
    with chromium_page() as (page, _):
        page.set_viewport_size({"width": 1200, "height": 1450})
        page.goto(report.as_uri())
        page.locator("figure.plot:has(svg.main-svg) >> nth=0").wait_for(timeout=60_000)
        save(page, png)


def photograph_runs_table(folder: Path, data: Path, png: Path) -> None:
    """MLflow's runs table as `mnist-sweep ui` opens it, the study run expanded and the compared columns added."""
    with serving(
        [*CLI, "ui", "sweeps/fcn.toml", "--port", str(free_port())],
        cwd=folder,
        env=cli_environment(data),
        needle="MLflow UI for study 'fcn'",
        goodbye="MLflow UI stopped",
        log=folder / "ui.log",
    ) as served:
        origin = served.url.split("/#/", 1)[0]
        with chromium_page(allow=origin) as (page, _):
            page.set_viewport_size({"width": 2000, "height": 600})
            open_runs_table(page, served.url)
            add_columns(page, COLUMNS)
            page.locator(f"{ROWS} {EXPAND}").first.click()
            page.locator(ROWS).nth(1).wait_for()
            page.wait_for_timeout(1000)  # the added columns fill in for the rows just shown
            save(page, png)


def add_columns(page: Any, names: list[str]) -> None:
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        page.locator(".du-bois-light-tree-treenode", has=page.get_by_text(name, exact=True)).first.locator(
            ".du-bois-light-tree-checkbox"
        ).click()
    page.keyboard.press("Escape")


def save(page: Any, png: Path) -> None:
    """The viewport as a PNG of at most 256 colours: screenshots of flat UI colours lose nothing visible."""
    page.screenshot(path=png)
    Image.open(png).convert("RGB").quantize(colors=256).save(png, optimize=True)
    size = png.stat().st_size
    print(f"{png.relative_to(REPO)}: {size // 1000} KB")
    if size > MAX_BYTES:
        sys.exit(f"{png.name} is {size} bytes, over {MAX_BYTES}: make its viewport smaller")


if __name__ == "__main__":
    main()
