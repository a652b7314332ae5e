"""The forgetting guard's regression set: bundled, varied general emails with good replies, built
into rows by the prompt builder the agent drafts with."""

from agent.prompt import DEFAULT_INSTRUCTIONS, IncomingEmail, build_messages
from feedback.samples import load_emails
from training.config import TrainConfig
from training.dataset import row_tokens
from training.regression_set import REGRESSION_SET, regression_rows


def test_the_regression_set_loads_and_every_row_goes_through_the_prompt_builder(tokenizer, model_settings):
    emails = load_emails(REGRESSION_SET)
    rows = regression_rows(tokenizer, model_settings)
    assert 24 <= len(rows) == len(emails) <= 40
    assert len({e.sender for e in emails}) == len(emails) and len({e.subject for e in emails}) == len(emails)
    for email, row in zip(emails, rows, strict=True):
        assert all(text.strip() for text in (email.sender, email.subject, email.body, email.reply)), email.id
        incoming = IncomingEmail(email.sender, email.subject, email.body)
        assert row["prompt"] == build_messages("", incoming, quoted_history_chars=model_settings.quoted_history_chars)
        assert row["prompt"][0] == {"role": "system", "content": DEFAULT_INSTRUCTIONS}  # no tenant's instructions
        assert row["completion"] == [{"role": "assistant", "content": email.reply}]
        assert row_tokens(tokenizer, row) <= TrainConfig.max_length  # scored whole, as a held-out row would be
