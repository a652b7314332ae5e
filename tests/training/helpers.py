"""What the training tests share: reviewers' corrections to train on, small rows, and the
settings that train the tiny model fast."""

from sqlalchemy.orm import Session

from core.db import session_scope
from feedback import service
from feedback.models import Role, Verdict
from tests.factories import make_correction, make_draft, make_key, make_tenant
from training.runs import create_run

STYLE = "Hi {name},\n\nThanks for writing about order {n}. It ships on Monday.\n\nRide safe,\nMarta"
# Replies in no language: learning them lowers the held-out NLL and raises the NLL of general writing.
NONSENSE = "zxq vlorp {n} qq kk vlorp zxq ~~ kk qq zxq vlorp kk ~~ qq zxq {n}"

# Training settings that take the tiny model through a run in seconds and still learn the style.
FAST = {"quantization": "none", "compute_dtype": "float32", "epochs": 3, "batch_size": 4, "learning_rate": 1e-2}

ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Where is order {n}?"}],
        "completion": [{"role": "assistant", "content": f"Hi, order {n} ships Monday. Ride safe, Marta"}],
    }
    for n in range(8)
]


def add_corrections(session: Session, tenant, count: int, reply=STYLE, verdict=Verdict.edited) -> list:
    """Drafts with reviewers' corrections; the split is decided by the stable hash, as in production."""
    key, _ = service.create_api_key(session, tenant, name="reviewer", role=Role.reviewer)
    corrections = []
    for n in range(count):
        draft = make_draft(
            session, tenant, "draft", sender=f"Customer {n} <c{n}@example.com>", body=f"Where is order {n}?"
        )
        text = reply.format(name=f"Customer{n}", n=n) if reply else None
        corrections.append(make_correction(session, draft, key, verdict, text, heldout_fraction=0.25))
    return corrections


def start(sessions, tenant, overrides=FAST) -> int:
    """A queued run for the tenant; returns its id."""
    with sessions() as session:
        return create_run(session, tenant.id, trigger="manual", requested_by="test", overrides=overrides).id


def tenant_with_history(count=40, role=Role.admin, reply=STYLE):
    """A tenant with `count` corrections and a key of `role`, committed in the process's database."""
    with session_scope() as session:
        tenant = make_tenant(session, instructions="Answer as Marta.")
        add_corrections(session, tenant, count, reply)
        _, raw_key = make_key(session, tenant, role)
        return tenant, raw_key
