"""Screenshots of MLflow's UI with mlops's runs and model versions (the pictures in README, MLflow).

Drives headless Chromium through Playwright: the experiment's runs, then the registered model with
its versions and the aliases the registry moved. Playwright is not a dependency of mlops; run it from
the MLflow virtualenv:

    .venv-mlflow/bin/pip install playwright && .venv-mlflow/bin/playwright install chromium
    # offline: a system Chromium instead (apt-get install chromium), passed as --chromium /usr/bin/chromium
    .venv-mlflow/bin/python scripts/mlflow_screenshot.py --url http://127.0.0.1:5000 \\
        --experiment tiny-reverse --model tiny-reverse-tiny --out-dir docs

Exit 1 with one line when the server, the experiment or the browser is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path


def api(url: str, path: str, **params: str) -> dict[str, object]:
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}?{q}", timeout=30) as r:  # noqa: S310 - the user's server
        return dict(json.loads(r.read()))


def _tidy(page: object) -> None:
    """MLflow 3's UI opens on its GenAI view with tips and an assistant panel: switch to the model
    training view and close what covers the tables (each only if it is there)."""
    for role, label in (("button", "Got it"), ("radio", "Model training"), ("button", "Close")):
        loc = page.get_by_role(role, name=label)  # type: ignore[attr-defined]
        try:
            if loc.count():
                loc.first.click(timeout=2000)
        except Exception:  # a tip that went away by itself, a label of another UI version
            pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:5000")
    p.add_argument("--experiment", default="tiny-reverse")
    p.add_argument("--model", default="tiny-reverse-tiny")
    p.add_argument("--out-dir", type=Path, default=Path("docs"))
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--chromium", help="A Chromium binary (e.g. /usr/bin/chromium) instead of Playwright's download.")
    a = p.parse_args()
    url = a.url.rstrip("/")
    try:
        exp = api(url, "experiments/get-by-name", experiment_name=a.experiment)["experiment"]
    except OSError as e:
        print(f"error: no MLflow experiment {a.experiment!r} at {url}: {e}", file=sys.stderr)
        return 1
    exp_id = exp["experiment_id"]  # type: ignore[index]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("error: playwright is not installed here (see this script's docstring)", file=sys.stderr)
        return 1
    a.out_dir.mkdir(parents=True, exist_ok=True)
    shots = {  # (page, text that shows it has rendered)
        "mlflow-runs.png": (f"{url}/#/experiments/{exp_id}/runs", "train"),
        "mlflow-model.png": (f"{url}/#/models/{urllib.parse.quote(a.model)}", "production"),
    }
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(headless=True, executable_path=a.chromium)
        except Exception as e:  # no browser downloaded (offline machines): say so, in one line
            print(f"error: no headless Chromium: {str(e).splitlines()[0]}", file=sys.stderr)
            return 1
        page = browser.new_page(viewport={"width": a.width, "height": 900})
        for name, (target, ready) in shots.items():
            # "load", not "networkidle": the UI polls, the network is never idle
            page.goto(target, wait_until="load", timeout=60_000)
            _tidy(page)
            page.get_by_text(ready, exact=False).first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)  # charts and tables fill in after their data calls
            _tidy(page)
            page.screenshot(path=str(a.out_dir / name), full_page=False)
            print(f"wrote {a.out_dir / name}")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
