"""Read the guide (docs/HYBRID_OPTIMIZATION_GUIDE.md, a copy of ../shared's) the way a user reads it."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "HYBRID_OPTIMIZATION_GUIDE.md"
SHARED_GUIDE = REPO.parent / "shared" / "HYBRID_OPTIMIZATION_GUIDE.md"


def guide_text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(heading of the section it appears under, code) for every fenced block of `language`, in order."""
    blocks, heading, fence, body = [], "", None, []
    for line in guide_text().splitlines():
        if fence is None and line.startswith("```"):
            fence, body = line[3:].strip(), []
        elif fence is not None and line.strip() == "```":
            if fence == language:
                blocks.append((heading, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def block_under(heading_prefix: str, language: str = "python", index: int = 0) -> str:
    matches = [code for heading, code in code_blocks(language) if heading.startswith(heading_prefix)]
    return matches[index]


def config_reference() -> dict[str, str]:
    """field -> default (source text) from the guide's Configuration Reference dataclass."""
    code = block_under("HybridTrainingConfig Parameters")
    return dict(re.findall(r"^\s+(\w+): \w+ = ([^\s#]+)", code, flags=re.M))
