import json

from typer.testing import CliRunner

from api.cli import app
from tests.training.helpers import FAST, tenant_with_history

runner = CliRunner()
FAST_FLAGS = [arg for name, value in FAST.items() for arg in ("--set", f"{name}={value}")]


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_train_eval_and_adapter_commands(worker_settings, tmp_path):
    tenant, _ = tenant_with_history()
    trained = cli("train", "--tenant", tenant.slug, *FAST_FLAGS)
    assert "step 1/" in trained and "promoted" in trained and "report:" in trained

    listed = cli("adapters", "list", "--tenant", tenant.slug)
    assert "champion" in listed.splitlines()[1]

    out = tmp_path / "train.jsonl"
    exported = cli("datasets", "export", "--tenant", tenant.slug, "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and f"{len(rows)} rows" in exported and set(rows[0]) == {"prompt", "completion"}

    scored = cli("eval", "--tenant", tenant.slug)
    assert "base: held-out NLL" in scored and "champion v1: held-out NLL" in scored
    assert (worker_settings.reports_dir / f"{tenant.slug}-versions.png").exists()

    assert "the base model" in cli("adapters", "rollback", "--tenant", tenant.slug, "--reason", "worse drafts")
    again = runner.invoke(app, ["adapters", "rollback", "--tenant", tenant.slug, "--reason", "again"])
    assert again.exit_code == 1 and "no champion" in again.output
    bad = runner.invoke(app, ["train", "--tenant", tenant.slug, "--set", "epochz=2"])
    assert bad.exit_code == 1 and "epochz: unknown setting (known: rank," in bad.output
