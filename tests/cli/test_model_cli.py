"""`umv2 model …` through the real console entry point, as a user runs it."""

import json
import subprocess
import sys

import pytest

REQUIRED_KEYS = {"activated_params", "activated_params_no_embedding", "total_params",
                 "total_params_no_embedding", "sparse_params", "flops_per_token", "mcp",
                 "decode_bytes_per_token"}


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "umv2cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "model" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "umv2cli.cli.app" in imported


def test_python_dash_m_prints_model_info_json():
    out = subprocess.run([sys.executable, "-m", "umv2cli", "model", "info", "ultramemv2-227m", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert REQUIRED_KEYS <= info.keys()
    assert abs(info["paper_convention"]["activated"] - 225e6) < 0.01 * 225e6
    assert info["config"]["sparse"]["kind"] == "ultramemv2"


def test_model_info_of_a_config_file_that_overrides_a_preset(umv2, tmp_path, monkeypatch):
    (tmp_path / "dense.toml").write_text('preset = "ultramemv2-227m"\nffn_hidden = 3000\n[sparse]\ntopm = 64\n')
    monkeypatch.chdir(tmp_path)
    info = json.loads(umv2("model", "info", "dense.toml", "--json")[1])
    assert info["config"]["ffn_hidden"] == 3000
    assert info["config"]["sparse"]["topm"] == 64 and info["config"]["sparse"]["knum"] == 360
    assert info["config"]["sparse"]["k_rc"] == 64  # re-derived from the new topm
    assert info["decode_bytes_per_token"] == 20 * 64 * 384 * 2


def test_model_info_table_names_the_paper_convention(umv2):
    code, out, _ = umv2("model", "info", "olmoe-227m")
    assert code == 0 and "paper convention" in out and "MCP" in out


def test_model_presets_lists_every_preset(umv2):
    from umv2cli.model.presets import PRESETS

    rows = json.loads(umv2("model", "presets", "--json")[1])
    assert [r["name"] for r in rows] == list(PRESETS)


@pytest.mark.parametrize("content,field", [
    ('preset = "tiny-ultramemv2"\n[sparse]\ntopm = 4096\n', "sparse.topm=4096"),
    ('preset = "tiny-ultramemv2"\n[sparse]\nbogus = 1\n', "sparse.bogus"),
    ('preset = "tiny-moe"\n[sparse]\ntopk = "8"\n', "sparse.topk='8'"),
    ('d_model = 64\nn_layers = 2\nn_heads = 3\nffn_hidden = 10\n', "n_heads=3"),
    ('d_model = 64\nn_layers = 2\nn_heads = 4\n', "ffn_hidden: missing"),
    ('preset = "tiny-dense"\ninit = "xavier"\n', "init='xavier'"),
    ('preset = "nope"\n', "preset 'nope'"),
    ('preset = "tiny-dense"\n[sparse]\nkind = "mlp"\n', "sparse.kind='mlp'"),
    ('preset = "tiny-ultramem"\n[sparse]\nplacement = "3:1"\n', "placement='3:1'"),
    ('preset = "tiny-memoryplus"\n[sparse]\nplacement = "0:2"\n', "replace_ffn needs pairs a:a"),
    ('preset = "tiny-ultramemv2"\n[sparse]\nshare_layers = 9\n', "sparse.share_layers=9"),
    ('preset = "tiny-ultramemv2"\n[sparse]\nk_rc = 99\n', "sparse.k_rc=99"),
    ('preset = "tiny-ultramemv2"\n[sparse]\ndv = 25\n', "sparse.dv=25"),
    ('d_model = [1, 2\n', "cannot parse"),
])
def test_bad_config_exits_2_with_one_line_naming_the_field(umv2, tmp_path, content, field):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code, _, err = umv2("model", "info", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], err
    assert path.read_text() == content  # nothing on disk touched


def test_unknown_preset_and_missing_file_exit_2(umv2):
    for arg in ("no-such-preset", "missing/config.toml"):
        code, _, err = umv2("model", "info", arg)
        assert code == 2 and err.count("\n") == 1 and "umv2 model presets" in err


def test_a_bad_option_is_a_usage_error_with_exit_2(umv2):
    code, _, err = umv2("model", "info", "tiny-dense", "--bytes-per-element", "0")
    assert code == 2 and "bytes-per-element" in err
