"""The held-out NLL of every evaluated adapter version, as the geometry of an inline SVG chart."""

from dataclasses import dataclass

from training.models import Adapter

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 624, 16, 200  # the plot area inside the SVG
TICKS = 4


@dataclass(frozen=True)
class ChartPoint:
    x: float
    y: float
    version: int
    status: str
    nll: float


@dataclass(frozen=True)
class Chart:
    points: list[ChartPoint]
    ticks: list[tuple[float, str]]  # (y, label) of the horizontal grid lines
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM

    @property
    def line(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


def versions_chart(adapters: list[Adapter]) -> Chart | None:
    """Versions in the order they were trained, left to right; None when none was evaluated."""
    scored = [a for a in adapters if "nll" in a.metrics]
    if not scored:
        return None
    values = [a.metrics["nll"] for a in scored]
    pad = (max(values) - min(values)) * 0.15 or abs(values[0]) * 0.1 or 1.0
    low, high = max(min(values) - pad, 0.0), max(values) + pad

    def y(value: float) -> float:
        return BOTTOM - (value - low) / (high - low) * (BOTTOM - TOP)

    step = (RIGHT - LEFT - 40) / max(len(scored) - 1, 1)
    points = [
        ChartPoint(
            x=LEFT + 20 + i * step if len(scored) > 1 else (LEFT + RIGHT) / 2,
            y=y(a.metrics["nll"]),
            version=a.version,
            status=a.status,
            nll=a.metrics["nll"],
        )
        for i, a in enumerate(scored)
    ]
    tick_values = [low + (high - low) * i / (TICKS - 1) for i in range(TICKS)]
    return Chart(points=points, ticks=[(y(v), f"{v:.2f}") for v in tick_values])
