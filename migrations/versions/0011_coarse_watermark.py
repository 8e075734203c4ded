"""The coarse rollup level is kept only below a per-run watermark, ``run.coarse_through``.

Until now every stored batch merged its rows into ``layer_stat_coarse`` as well as into the
64-step blocks: a rewrite of each of its layers' coarse rows per batch, about a quarter of the
database's extra work per batch on ``bench/ingest.py``'s stream. From this revision a batch
writes coarse rows only for steps below its run's watermark (a late batch, a lagging rank), and
the batch that takes the run into a new coarse block computes the finished coarse blocks below
it from their 64-step blocks, once; reads take coarse blocks below the watermark and 64-step
blocks above it (``docs/storage.md``).

Upgrade: every coarse row stored so far is exact, so each run's watermark starts past its last
step. Downgrade: the coarse rows at and above each run's watermark are computed from the
64-step blocks (the columns read off the table), then the column is dropped. The column is
added and dropped in place (no table copy on SQLite: copying ``run`` would cascade deletes).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COARSE = 1024
_FACTOR = 16


def upgrade() -> None:
    op.add_column('run', sa.Column('coarse_through', sa.BigInteger(), nullable=False, server_default='0'))
    op.execute(f"UPDATE run SET coarse_through = (last_step / {_COARSE} + 1) * {_COARSE} "
               "WHERE last_step IS NOT NULL AND last_step >= 0")


def downgrade() -> None:
    names = [c["name"] for c in sa.inspect(op.get_bind()).get_columns('layer_stat_coarse')]
    stats = [c[:-4] for c in names if c.endswith("_min") and c != "step_min"]
    cols = ["layer_id", "block", "rank", "step_min", "step_max", "n", "mom_n", "mom_mean", "mom_m2", "mom_skip"]
    sel = ["layer_id", f"block / {_FACTOR}", "rank", "min(step_min)", "max(step_max)", "sum(n)", "sum(mom_n)",
           "max(g.mu)", "CASE WHEN max(g.mu) IS NULL THEN NULL ELSE sum(CASE WHEN mom_n > 0 THEN mom_m2 + mom_n * "
           "(mom_mean - g.mu) * (mom_mean - g.mu) ELSE 0.0 END) END", "sum(mom_skip)"]
    for st in stats:
        cols += [f"{st}_min", f"{st}_max", f"{st}_sum", f"{st}_cnt", f"{st}_nan"]
        sel += [f"min({st}_min)", f"max({st}_max)", f"sum({st}_sum)", f"sum({st}_cnt)", f"sum({st}_nan)"]
    above = (f"EXISTS (SELECT 1 FROM layer l JOIN run r ON r.id = l.run_id WHERE l.id = {{lid}} AND {{blk}} >= "
             f"r.coarse_through / {_COARSE})")
    op.execute("DELETE FROM layer_stat_coarse WHERE " + above.format(blk="layer_stat_coarse.block",
                                                                     lid="layer_stat_coarse.layer_id"))
    mine = above.format(blk=f"layer_stat_block.block / {_FACTOR}", lid="layer_stat_block.layer_id")
    means = (f"SELECT layer_id AS g_lid, block / {_FACTOR} AS g_blk, rank AS g_rank, sum(mom_n * mom_mean) / "
             f"CAST(sum(mom_n) AS DOUBLE PRECISION) AS mu FROM layer_stat_block WHERE mom_n > 0 AND {mine} "
             f"GROUP BY layer_id, block / {_FACTOR}, rank")
    op.execute(f"INSERT INTO layer_stat_coarse ({', '.join(cols)}) SELECT {', '.join(sel)} FROM layer_stat_block "
               f"LEFT JOIN ({means}) g ON g.g_lid = layer_id AND g.g_blk = block / {_FACTOR} AND g.g_rank = rank "
               f"WHERE {mine} GROUP BY layer_id, block / {_FACTOR}, rank")
    op.drop_column('run', 'coarse_through')
