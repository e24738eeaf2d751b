"""The generated code in libs/common/src/herald is exactly what `make proto` produces."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    _generator().generate(tmp_path)
    fresh = _files(tmp_path / "herald")
    committed = _files(ROOT / "libs" / "common" / "src" / "herald")
    assert sorted(fresh) == sorted(committed), "run `make proto`: generated files differ"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    if stale:
        pytest.fail(f"run `make proto`: stale generated files {stale}")


def test_the_api_marks_required_output_only_and_resource_fields() -> None:
    from google.api import field_behavior_pb2, resource_pb2

    from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
    from herald.dispatch.v1 import dispatch_service_pb2 as dispatch_pb

    def behaviour(message: Any, field: str) -> set[int]:
        options = message.DESCRIPTOR.fields_by_name[field].GetOptions()
        return set(options.Extensions[field_behavior_pb2.field_behavior])

    fb = field_behavior_pb2.FieldBehavior
    assert behaviour(campaign_pb.Campaign, "name") == {fb.IDENTIFIER}
    assert behaviour(campaign_pb.Campaign, "create_time") == {fb.OUTPUT_ONLY}
    assert behaviour(campaign_pb.Campaign, "display_name") == {fb.REQUIRED}
    assert behaviour(campaign_pb.CreateCampaignRequest, "campaign") == {fb.REQUIRED}
    assert behaviour(dispatch_pb.UpdateDestinationRequest, "update_mask") == {fb.REQUIRED}
    resource = campaign_pb.Campaign.DESCRIPTOR.GetOptions().Extensions[resource_pb2.resource]
    assert (resource.type, list(resource.pattern)) == ("herald.dev/Campaign", ["campaigns/{campaign}"])
    reference = (
        campaign_pb.GetCampaignRequest.DESCRIPTOR.fields_by_name["name"]
        .GetOptions()
        .Extensions[resource_pb2.resource_reference]
    )
    assert reference.type == "herald.dev/Campaign"
