import uuid

from sqlalchemy import select
from typer.testing import CliRunner

from api.cli import app
from feedback.models import ApiKey, Tenant
from feedback.service import authenticate

runner = CliRunner()


def test_cli_creates_a_tenant_and_a_key_shown_once(postgres_engine, pg_session):
    slug = f"cli-{uuid.uuid4().hex[:8]}"
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    created = runner.invoke(
        app, ["tenants", "create", "--slug", slug, "--name", "CLI Co", "--instructions", "Be kind."]
    )
    assert created.exit_code == 0, created.output
    key = runner.invoke(app, ["keys", "create", "--tenant", slug, "--role", "reviewer", "--name", "team"])
    assert key.exit_code == 0, key.output
    raw_key = key.output.strip().splitlines()[-1]

    tenant = pg_session.scalar(select(Tenant).where(Tenant.slug == slug))
    assert tenant.instructions == "Be kind."
    stored = authenticate(pg_session, raw_key)
    assert stored.tenant_id == tenant.id and stored.role == "reviewer"
    assert raw_key not in {k.key_hash for k in pg_session.scalars(select(ApiKey))}


def test_cli_errors_say_what_to_fix(postgres_engine):
    missing = runner.invoke(app, ["keys", "create", "--tenant", "no-such-tenant", "--role", "agent", "--name", "x"])
    assert missing.exit_code == 1 and "no tenant with slug 'no-such-tenant'" in missing.output
    bad_role = runner.invoke(app, ["keys", "create", "--tenant", "x", "--role", "boss", "--name", "x"])
    assert bad_role.exit_code == 2 and "agent" in bad_role.output


def test_cli_refuses_instructions_beyond_the_prompt_budget(postgres_engine, pg_session, tokenizer):
    slug = f"cli-{uuid.uuid4().hex[:8]}"
    long = "Always answer in the house style, and never promise a refund. " * 150
    created = runner.invoke(app, ["tenants", "create", "--slug", slug, "--name", "CLI Co", "--instructions", long])
    assert created.exit_code == 1 and "1536" in created.output and "tokens" in created.output, created.output
    assert pg_session.scalar(select(Tenant).where(Tenant.slug == slug)) is None


def test_cli_shows_sets_and_clears_a_tenants_adapter_scale(postgres_engine, pg_session):
    slug = f"cli-{uuid.uuid4().hex[:8]}"
    assert runner.invoke(app, ["tenants", "create", "--slug", slug, "--name", "CLI Co"]).exit_code == 0

    def scale(*args: str):
        result = runner.invoke(app, ["tenants", "adapter-scale", "--tenant", slug, *args])
        stored = pg_session.scalar(select(Tenant.adapter_scale).where(Tenant.slug == slug))
        return result.exit_code, result.output, stored

    assert scale() == (0, f"{slug}: each adapter version is served at its chosen scale; no champion yet\n", None)
    assert scale("0.8") == (0, f"{slug}: every adapter version is served at scale 0.8 (the tenant's setting)\n", 0.8)
    code, output, stored = scale("2.5")
    assert code == 1 and "in (0, 2] with at most two decimals" in output and stored == 0.8
    code, output, stored = scale("0.5", "--clear")
    assert code == 2 and "not both" in output and stored == 0.8
    code, output, stored = scale("--clear")
    assert code == 0 and "its chosen scale" in output and stored is None


def test_cli_makes_a_tenant_a_team_of_an_organization_and_undoes_it(postgres_engine, pg_session):
    org, team = (f"cli-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for slug in (org, team):
        assert runner.invoke(app, ["tenants", "create", "--slug", slug, "--name", "CLI Co"]).exit_code == 0

    def organization(*args: str):
        result = runner.invoke(app, ["tenants", "organization", "--tenant", team, *args])
        stored = pg_session.scalar(select(Tenant.organization_id).where(Tenant.slug == team))
        return result.exit_code, result.output, stored

    org_id = pg_session.scalar(select(Tenant.id).where(Tenant.slug == org))
    assert organization() == (0, f"{team} belongs to no organization\n", None)
    assert organization(org) == (0, f"{team} is a team of {org}\n", org_id)
    nested = runner.invoke(app, ["tenants", "organization", "--tenant", org, team])
    assert nested.exit_code == 1 and "is a team of another organization" in nested.output
    assert organization("--clear") == (0, f"{team} belongs to no organization\n", None)
