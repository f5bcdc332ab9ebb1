"""The report's language-task section: private sequences beside their reconstructions.

For each run (up to `MAX_TEXT_RUNS`), the first and the last round with saved pairs and the
lowest attacked client in it, every attack is shown on the same private sequences: a token
grid (one column per position, the truth on top, one row per attack; recovered positions
highlighted) and the decoded texts with their token accuracy.
"""

from __future__ import annotations

from fedleak.report.collect import Study
from fedleak.report.document import Block, Cell, Heading, Table, Text
from fedleak.report.gallery import whose
from fedleak.report.texts import TokenPairs, load_token_pairs, text_files

MAX_TEXT_RUNS = 12
SEQUENCES_SHOWN = 2


def _escaped(text: str, keep: str = " ") -> str:
    """Control characters as their escapes: printed raw they show as nothing or as a box."""
    return "".join(
        c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _shown(piece: str) -> str:
    # A leading space marks a word start; show it, since table cells trim whitespace.
    return _escaped(piece, keep=" \n").replace("\n", "⏎").replace(" ", "·") or "∅"


def _chosen(study: Study) -> list[tuple[str, int, int, list[TokenPairs]]]:
    """(run, round, client, each attack's pairs) of the shown samples."""
    out = []
    for run in study.runs[:MAX_TEXT_RUNS]:
        saved = [load_token_pairs(path) for path in text_files(run.path)]
        if not saved:
            continue
        rounds = sorted({s.round for s in saved})
        for server_round in dict.fromkeys((rounds[0], rounds[-1])):
            client = min(s.client for s in saved if s.round == server_round)
            same = [s for s in saved if s.round == server_round and s.client == client]
            out.append((run.name, server_round, client, sorted(same, key=lambda s: s.attack)))
    return out


def _grid(attacks: list[TokenPairs], target: int) -> Table | None:
    first = next((p for s in attacks for p in s.pairs if p.target_index == target), None)
    if first is None:
        return None
    length = len(first.truth)
    rows = [(Cell("truth"), *(Cell(_shown(p)) for p in first.truth_pieces))]
    texts = []
    for saved in attacks:
        pair = next((p for p in saved.pairs if p.target_index == target), None)
        if pair is None:
            continue
        recovered = pair.recovered
        rows.append(
            (
                Cell(saved.attack),
                *(
                    Cell(_shown(piece), bold=hit, title="recovered" if hit else "")
                    for piece, hit in zip(pair.reconstruction_pieces, recovered, strict=True)
                ),
            )
        )
        texts.append((saved.attack, "".join(pair.reconstruction_pieces), sum(recovered)))
    caption = f"truth: “{_escaped(''.join(first.truth_pieces))}”; " + "; ".join(
        f"{attack} ({hits}/{length} tokens): “{_escaped(text)}”" for attack, text, hits in texts
    )
    return Table(
        columns=("", *(str(i + 1) for i in range(length))), rows=tuple(rows), caption=caption
    )


def texts_section(study: Study) -> list[Block]:
    """Token grids of the shown samples; [] when no run saved token pairs."""
    chosen = _chosen(study)
    if not chosen:
        return []
    blocks: list[Block] = [
        Heading("Reconstructed text"),
        Text(
            "Each grid: a client's private sequence (top row, one column per token; · marks a "
            "leading space) and every attack's reconstruction of it below, matched as for "
            "scoring; highlighted cells are positions where the attack recovered the true "
            "token. The caption gives the texts; bytes that are not whole or printable "
            "characters read \\xNN."
        ),
    ]
    for run, server_round, client, attacks in chosen:
        where = f"{run}: " if study.kind == "sweep" else ""
        targets = sorted({p.target_index for s in attacks for p in s.pairs})
        for target in targets[:SEQUENCES_SHOWN]:
            grid = _grid(attacks, target)
            if grid is not None:
                blocks += [
                    Heading(f"{where}round {server_round}, {whose(client)}, sequence {target}", 3),
                    grid,
                ]
    return blocks
