"""export.push_to_hub / `hmcl export --push-to-hub`: one commit of the verified exports, against a
stand-in for the Hub's API (this machine has no Hub access: what the real Hub does with the calls
is not tested here)."""

import json

import pytest

from conftest import write_recipe
from test_bad_inputs import cli


class FakeHub:
    """Records what hmcl asks of huggingface_hub.HfApi; ``fail`` makes the commit raise."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token))

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        FakeHub.calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        if FakeHub.fail:
            raise FakeHub.fail
        FakeHub.calls.append(("create_commit", repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kw))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def hub(monkeypatch, hub_up):
    import huggingface_hub

    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub


def _trained_run(tmp_path, tiny_bert, capsys, monkeypatch, **export):
    recipe = write_recipe(tmp_path, tiny_bert, train={"max_steps": 2, "eval_steps": 2, "save_steps": 2},
                          export={"formats": ["merged"], **export})
    code, out, err = cli(capsys, monkeypatch, "run", recipe)
    return recipe, code, out, err


def test_run_pushes_the_verified_exports_in_one_commit_with_the_eval_results(tmp_path, tiny_bert, capsys, monkeypatch, hub):
    recipe, code, out, err = _trained_run(tmp_path, tiny_bert, capsys, monkeypatch,
                                          push_to_hub={"repo": "my-org/tiny", "branch": "weekly"})
    assert code == 0, err
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["init", "create_repo", "create_branch", "create_commit"]  # after the export, once
    assert hub.calls[0][1] == "hf_test_token"
    assert hub.calls[1][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    _, repo, files, kw = hub.calls[3]
    merged = tmp_path / "run" / "export" / "merged"
    assert repo == "my-org/tiny" and kw["revision"] == "weekly"
    assert files == {p.relative_to(merged).as_posix(): str(p) for p in merged.rglob("*") if p.is_file()}
    assert {"modules.json", "README.md", "1_Pooling/config.json"} <= set(files)
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["results"]["dev-retrieval"]
    assert kw["commit_message"] == (f"hmcl tiny: dev-retrieval ndcg@10 {results['fine-tuned']['ndcg@10']:.4f} "
                                    f"(base {results['base']['ndcg@10']:.4f})")
    assert "export pushed -> my-org/tiny (weekly): https://huggingface.co/my-org/tiny/commit/abc" in out


def test_onnx_graphs_go_under_hmcl_onnx(tmp_path, tiny_bert, hub):
    pytest.importorskip("onnxruntime")
    from hmcl_cli.export.hub import repo_files
    from hmcl_cli.recipe import load_recipe
    from hmcl_cli.stages import run_export

    recipe = load_recipe(write_recipe(tmp_path, tiny_bert, export={"formats": ["merged", "onnx"],
                                                                    "push_to_hub": {"repo": "my-org/tiny"}}))
    run_export(recipe, model_dir=tiny_bert)
    files = hub.calls[-1][2]
    assert "model.onnx" not in files and "hmcl_onnx/model.onnx" in files and "modules.json" in files
    assert [name for name, _ in repo_files(tmp_path / "run" / "export")] == list(files)
    # a later export of merged alone does not push the earlier ONNX folder left beside it
    run_export(recipe, formats=["merged"], model_dir=tiny_bert)
    assert (tmp_path / "run" / "export" / "onnx").is_dir()
    assert not [name for name in hub.calls[-1][2] if name.startswith("hmcl_onnx")]


def test_a_failed_upload_says_how_to_push_again(tmp_path, tiny_bert, capsys, monkeypatch, hub):
    hub.fail = ConnectionError("Max retries exceeded with url: /api/repos/create\nmore detail")
    model = tmp_path / "run"
    recipe, code, out, err = _trained_run(tmp_path, tiny_bert, capsys, monkeypatch, push_to_hub={"repo": "my-org/tiny"})
    flat = " ".join(err.split())
    assert code == 11 and "push error: export.push_to_hub my-org/tiny: the upload failed (ConnectionError: Max retries" in flat
    assert "more detail" not in flat and "hmcl export --model RUN --push-to-hub my-org/tiny" in flat
    assert (model / "export" / "merged" / "modules.json").is_file()  # the verified export is kept


def test_run_without_a_token_stops_before_training(tmp_path, tiny_bert, capsys, monkeypatch, hub):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no cached login either
    recipe, code, out, err = _trained_run(tmp_path, tiny_bert, capsys, monkeypatch,
                                          push_to_hub={"repo": "my-org/tiny", "token_env": "MY_HUB_TOKEN"})
    assert code == 11 and "$MY_HUB_TOKEN is not set" in err and "export MY_HUB_TOKEN=" in " ".join(err.split())
    assert not (tmp_path / "run").exists() and hub.calls == []


def test_run_where_the_hub_is_out_of_reach_stops_before_training(tmp_path, tiny_bert, capsys, monkeypatch, hub,
                                                                 hub_down):
    recipe, code, out, err = _trained_run(tmp_path, tiny_bert, capsys, monkeypatch, push_to_hub={"repo": "my-org/tiny"})
    flat = " ".join(err.split())
    assert code == 11 and f"my-org/tiny: nothing can be uploaded: {hub_down} cannot be reached: ConnectError" in flat
    assert "run where the Hub can be reached" in flat
    assert not (tmp_path / "run").exists() and hub.calls == []


def test_export_flag_and_its_checks(tmp_path, tiny_bert, capsys, monkeypatch, hub):
    code, out, err = cli(capsys, monkeypatch, "export", "--model", tiny_bert, "--out", tmp_path / "x",
                         "--push-to-hub", "my-org/tiny", "--public")
    assert code == 0, err
    assert hub.calls[1][2]["private"] is False and "README.md" in hub.calls[-1][2]
    code, _, err = cli(capsys, monkeypatch, "export", "--model", tiny_bert, "--push-to-hub", "not a repo")
    assert code == 2 and "not a model repo id" in err
    code, _, err = cli(capsys, monkeypatch, "export", "--model", tiny_bert, "--out", tmp_path / "y", "--format", "onnx",
                       "--push-to-hub", "my-org/tiny")
    assert code == 11 and "no merged export to push" in err

