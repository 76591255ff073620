"""Accounting (model/accounting.py) against instantiated models and the paper's tables."""

import dataclasses
import json
from pathlib import Path

import pytest

from umv2cli.config import UltraMemV2Config
from umv2cli.model.accounting import account
from umv2cli.model.presets import MCP_ABLATION_DK, PRESETS, get_preset
from umv2cli.model.transformer import build_model

ASSETS = Path(__file__).parent.parent / "assets" / "model_info"


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


VARIANTS = {
    **{name: get_preset(name) for name in PRESETS if name.startswith("tiny-")},
    "v2 untied": dataclasses.replace(get_preset("tiny-ultramemv2"), tie_embeddings=False),
    "v2 shared query": dataclasses.replace(get_preset("tiny-ultramemv2"), sparse=dataclasses.replace(
        get_preset("tiny-ultramemv2").sparse, shared_rank_query=True)),
    "v2 ring g=4, E_k=2": dataclasses.replace(get_preset("tiny-ultramemv2"), sparse=UltraMemV2Config(
        knum=6, topm=8, dk=8, dv=12, dp=4, share_layers=4, key_expand=2)),
    "v2 skip placement": dataclasses.replace(get_preset("tiny-ultramemv2"), sparse=UltraMemV2Config(
        knum=6, topm=8, dk=8, dv=12, dp=0, placement="0:1/2:3")),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_analytic_total_params_equal_the_instantiated_model(name):
    cfg = VARIANTS[name]
    acc = account(cfg)
    model = build_model(cfg)
    assert acc.total_params == numel(model)
    embedding = sum(p.numel() for n, p in model.named_parameters() if n in ("embed.weight", "lm_head.weight"))
    assert acc.embedding_params == embedding
    assert acc.total_params_no_embedding == acc.total_params - embedding
    assert acc.activated_params - acc.activated_params_no_embedding == embedding
    assert acc.sparse_params <= acc.total_params_no_embedding


def test_ultramemv2_activated_params_are_dense_plus_m_rows_per_layer():
    cfg = VARIANTS["v2 ring g=4, E_k=2"]
    acc = account(cfg)
    m_rows = 4 * cfg.sparse.topm * (cfg.sparse.dv + cfg.sparse.dp)
    assert acc.activated_params_no_embedding == acc.total_params_no_embedding - acc.sparse_params + m_rows
    assert acc.decode_bytes_per_token == 2 * m_rows


def within(value, target, rel):
    return abs(value - target) <= rel * target


def test_table10_227m_rows_in_the_papers_convention():
    v2, moe = account(get_preset("ultramemv2-227m")), account(get_preset("olmoe-227m"))
    assert within(v2.paper_convention["activated"], 225e6, 0.01)
    assert within(v2.paper_convention["total"], 1.18e9, 0.01)
    assert within(moe.paper_convention["activated"], 227e6, 0.01)
    assert within(moe.paper_convention["total"], 1.18e9, 0.01)


def test_table4_mcp_within_one_point():
    paper = dict(zip(MCP_ABLATION_DK, (12.0, 14.5, 17.0, 19.5, 23.0, 25.0, 27.5)))
    for dk, mcp in paper.items():
        assert abs(100 * account(get_preset(f"ultramemv2-500m-dk{dk}")).mcp - mcp) < 1.0, dk
    flops = {account(get_preset(f"ultramemv2-500m-dk{dk}")).flops_per_token for dk in MCP_ABLATION_DK}
    assert (max(flops) - min(flops)) / min(flops) < 1e-3  # iso-FLOP across the ablation


@pytest.mark.parametrize("preset", ["olmoe-227m", "ultramemv2-227m", "ultramem-227m", "memoryplus-227m",
                                    "olmoe-1b7b", "ultramemv2-1b7b"])
def test_model_info_matches_the_golden_file(preset):
    got = account(get_preset(preset)).to_dict()
    path = ASSETS / f"{preset}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=2) + "\n")
        pytest.fail(f"recorded {path}; run again")
    assert got == json.loads(path.read_text()), (
        f"accounting of {preset} changed; delete {path} to re-record if this is intended")
