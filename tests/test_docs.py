"""The documentation site builds from docs/ with warnings as errors, offline, in seconds.

`mkdocs build --strict` fails on a broken link or anchor between pages, a page missing from the nav, a snippet
include that points nowhere, and a docstring mkdocstrings cannot read. The build runs with every proxy pointed
at a closed port, so a theme or plugin that tried to fetch anything would fail here.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests._recipe_utils import ROOT


def test_docs_site_builds_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    closed = "http://127.0.0.1:9"  # discard port: nothing listens, so any fetch fails
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "NO_MKDOCS_2_WARNING": "1",
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "http_proxy": closed,
        "https_proxy": closed,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    # the API reference is generated from the docstrings of both packages
    trainers = (site / "api" / "trainers" / "index.html").read_text()
    assert 'id="trainers.StarSSEConfig"' in trainers and 'id="trainers.StarSSETrainer"' in trainers
    library = (site / "api" / "hf_ens" / "index.html").read_text()
    assert 'id="hf_ens.EnsembleModel.from_pretrained"' in library and 'id="hf_ens.uniform_soup"' in library
    # the demo guide shows the README's demo table itself (a snippet include), not a copy that could drift
    demo = (site / "demo" / "index.html").read_text()
    row = "range  greedy soup"
    assert row in demo and row in (ROOT / "README.md").read_text()
    # every guide the README links to is a page of the site
    for page in (
        "trainer",
        "parallel_members",
        "lora",
        "language_models",
        "basin",
        "hub",
        "data_path",
        "reliability",
        "tasks",
        "transformers_model",
        "results",
    ):
        assert (site / page / "index.html").is_file(), page
