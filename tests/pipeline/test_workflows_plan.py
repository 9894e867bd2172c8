"""Every file in ``workflows/`` stays true to the code: each pipeline workflow loads and plans (stage
names, keys, column order: ``plan.check``, what ``clipcurate plan`` prints), and the eval config loads as
one. Models and data are not touched (the production workflows name weights that cannot be downloaded
here); the runs of the demo-sized workflows are in their own tests."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / "workflows").glob("*.yaml"))


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 10


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_each_workflow_plans(path):
    from pipeline import config, plan
    from pipeline.evaluate import config as eval_config

    doc = yaml.safe_load(path.read_text())
    if "stages" not in doc:  # an eval config (``clipcurate eval``)
        eval_config.load(str(path))
        return
    steps = plan.check(config.load(path))
    names = [next(iter(s)) for s in doc["stages"]]
    assert len(steps) == len(names)
