"""The pages in a real browser: the app served by uvicorn on a free local port (in a thread, on
the PostgreSQL test database), Debian's chromium driven through chromedriver, and tenants whose
data is committed (the server reads it from its own connections) and deleted after each test."""

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import uvicorn
from safetensors.torch import save_file
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from core.db import committing
from core.settings import get_settings
from feedback.models import ApiKey, Role, Tenant, Verdict, utcnow
from tests.factories import make_correction, make_draft, make_key, make_tenant, store_version
from tests.web.samples import EMAILS
from training import registry
from training.models import Adapter, RunStatus, TrainingRun
from training.runs import create_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Without these, headless chromium on a machine without network stalls on lookups and updates.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@dataclass
class Shop:
    """A tenant with a reviewer and an admin key (raw, to type into the sign-in form) and drafts."""

    tenant_id: int
    reviewer: str
    admin: str
    agent: str
    reviewer_key_id: int
    draft_ids: list[int] = field(default_factory=list)


@pytest.fixture(scope="session")
def committed(postgres_engine) -> sessionmaker[Session]:
    return sessionmaker(bind=postgres_engine, expire_on_commit=False)


def _make_shop(committed: sessionmaker[Session], name: str) -> Shop:
    with committed() as session, committing(session):
        tenant = make_tenant(session)
        tenant.name = name
        reviewer, reviewer_raw = make_key(session, tenant, Role.reviewer)
        reviewer.name = "Marta"
        admin, admin_raw = make_key(session, tenant, Role.admin)
        admin.name = "Ops"
        _, agent_raw = make_key(session, tenant, Role.agent)
        drafts = [
            make_draft(session, tenant, text, sender=sender, subject=subject, body=body)
            for sender, subject, body, text in EMAILS
        ]
        return Shop(tenant.id, reviewer_raw, admin_raw, agent_raw, reviewer.id, [d.id for d in drafts])


@pytest.fixture
def shops(committed) -> Iterator[list[Shop]]:
    """Two tenants, each with its own keys and three pending drafts; deleted (cascading) afterwards."""
    made = [_make_shop(committed, "Northwind Cycles"), _make_shop(committed, "Southgate Skis")]
    yield made
    with committed() as session, committing(session):
        session.execute(delete(Tenant).where(Tenant.id.in_([shop.tenant_id for shop in made])))


@pytest.fixture
def shop(shops) -> Shop:
    return shops[0]


@pytest.fixture(scope="session")
def web_settings(tmp_path_factory) -> Iterator[None]:
    """A signing key and a var folder of the tests' own for every app the web tests create."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRAFTLOOP_SECRET_KEY", secrets.token_urlsafe(32))
        patch.setenv("DRAFTLOOP_VAR_DIR", str(tmp_path_factory.mktemp("web-var")))
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def server(postgres_engine, web_settings) -> Iterator[str]:
    """The real app on a free local port, in a background thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> Iterator[webdriver.Chrome]:
    """Debian's chromium, headless, with a fresh profile. Missing, it fails the tests: `make test`
    installs it (`make browser`), and CI must prove the pages work in a browser."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert path.exists(), f"{path} is missing: run `make browser` (Debian's chromium and chromium-driver)"
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # never Selenium Manager
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _replaced(element):
    """A wait condition: the element's page is gone. Selenium's staleness_of asks the element
    whether it is enabled and expects a stale-element error once the page is replaced; while the
    old page is torn down chromedriver may answer instead with an inspector error ("Node with
    given id does not belong to the document"), which also means it is gone."""

    def gone(driver) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if "does not belong to the document" in str(error.msg):
                return True
            raise
        return False

    return gone


class Browser:
    """The browser on the test server, with the few steps the tests repeat."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver, self.base_url = driver, base_url

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str = "main") -> str:
        return self.find(css).text

    def wait(self, condition, timeout: float = 10):
        """Until condition holds; an element replaced by the next page while it is read is read again."""
        ignored = (NoSuchElementException, StaleElementReferenceException)
        return WebDriverWait(self.driver, timeout, ignored_exceptions=ignored).until(condition)

    def submit(self, button_css: str) -> None:
        """Click a form's button and wait until the page it posts to has replaced this one: read
        while the old page is torn down, an element fails with an inspector error, not a stale one."""
        page = self.find("html")
        self.find(button_css).click()
        self.wait(_replaced(page))

    def wait_for_path(self, path: str) -> None:
        self.wait(lambda d: d.current_url == self.base_url + path)

    def sign_in(self, key: str) -> None:
        self.open("/web/signin")
        self.find("#api_key").send_keys(key)
        self.submit("form button[type=submit]")
        self.wait_for_path("/web/queue")

    def screenshot(self, name: str, width: int = 1280) -> Path:
        """The whole page at this width, under artifacts/screenshots/."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.set_window_size(width, 900)
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(width, max(height + 120, 400))
        path = SCREENSHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1280, 900)
        return path


@pytest.fixture
def browser(chromium, server) -> Browser:
    """The session's browser, signed out (its cookies cleared) at the start of each test."""
    chromium.get(server + "/web/signin")
    chromium.delete_all_cookies()
    chromium.set_window_size(1280, 900)
    return Browser(chromium, server)


@dataclass
class Versions:
    """Three adapter versions of the shop: v1 retired, v2 the champion, v3 rejected by the gate."""

    shop: Shop
    adapter_ids: dict[int, int]  # version -> adapter id
    run_id: int


def _adapter(session: Session, tenant_id: int, version: int, run_id: int, nll: float, chrf: float) -> Adapter:
    """A registered version with real files (promotion checks them) but random weights."""
    settings = get_settings()
    trained = settings.var_dir / f"trained-{tenant_id}-{version}"
    trained.mkdir(parents=True)
    (trained / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"lora_A": torch.randn(4, 8)}, str(trained / "adapter_model.safetensors"))
    adapter = store_version(session, settings, tenant_id, trained, training_run_id=run_id)
    assert adapter.version == version
    adapter.metrics = {"nll": nll, "chrf": chrf, "loop_rate": 0.25 / version, "style": 0.5 * version, "run_id": run_id}
    return adapter


def _finished_run(session: Session, tenant_id: int, status: RunStatus, reason: str, summary: dict) -> TrainingRun:
    run = create_run(session, tenant_id, trigger="schedule", requested_by="beat")
    run.status, run.decision_reason, run.finished_at = status, reason, utcnow()
    run.step, run.total_steps, run.loss = 12, 12, 1.234
    run.report = {"summary": summary, "heldout_examples": 35, "drafted_examples": 32}
    session.flush()
    return run


@pytest.fixture
def versions(shop, committed) -> Versions:
    """Adapter versions with scores, runs with the gate's decisions, and reviewed drafts of each
    version: v1 drafted two (one accepted, one edited by 1 word), v2 two (both accepted)."""
    with committed() as session, committing(session):
        tenant_id = shop.tenant_id
        reviewer = session.get(ApiKey, shop.reviewer_key_id)
        scores = [(2.10, 31.2), (1.80, 38.5), (1.79, 38.9)]
        adapters = {}
        for version, (nll, chrf) in enumerate(scores, start=1):
            decision = (RunStatus.rejected, "improvement not significant: 95% CI [-0.0100, 0.0300] includes zero")
            if version < 3:
                decision = (RunStatus.promoted, f"held-out NLL {nll + 0.3:.3f} -> {nll:.3f} (14.3% better)")
            style = {"loop_rate": 0.15, "opening": 0.75, "closing": 0.5}
            summary = {"base": {"nll": 2.9, "chrf": 20.4}, "candidate": {"nll": nll, "chrf": chrf} | style}
            run = _finished_run(session, tenant_id, *decision, summary)
            adapter = _adapter(session, tenant_id, version, run.id, nll, chrf)
            if version < 3:
                registry.promote(
                    session, get_settings(), adapter, actor=f"gate (run {run.id})", reason=run.decision_reason
                )
            else:
                registry.reject(session, adapter, actor=f"gate (run {run.id})", reason=run.decision_reason)
            adapters[version] = adapter.id
        tenant = session.get(Tenant, tenant_id)
        for adapter_id, verdict, final in [
            (adapters[1], Verdict.accepted, None),
            (adapters[1], Verdict.edited, "Hi Sam, the order ships today."),
            (adapters[2], Verdict.accepted, None),
            (adapters[2], Verdict.accepted, None),
        ]:
            draft = make_draft(session, tenant, "Hi Sam, the order ships Monday.", adapter_id=adapter_id)
            make_correction(session, draft, reviewer, verdict, final)
    return Versions(shop, adapters, run.id)
