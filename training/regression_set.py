"""The forgetting guard's regression set: general emails that belong to no tenant, each with a
good reply (regression_set.jsonl, beside this file). Its rows are built as a tenant's rows are
(training/dataset.py), under the default instructions, so example_nll scores a reply given the
prompt the agent would draft it with. The gate rejects a candidate whose NLL on them is worse than
the base model's by more than DRAFTLOOP_FORGETTING_MARGIN."""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from agent.prompt import IncomingEmail
from core.settings import Settings
from feedback.samples import load_emails
from training.dataset import email_row

REGRESSION_SET = Path(__file__).with_name("regression_set.jsonl")


def regression_rows(tokenizer: PreTrainedTokenizerBase, settings: Settings) -> list[dict]:
    """The regression set as prompt/completion rows; "" instructions are the default ones."""
    return [
        email_row("", IncomingEmail(e.sender, e.subject, e.body), e.reply, tokenizer, settings)
        for e in load_emails(REGRESSION_SET)
    ]
