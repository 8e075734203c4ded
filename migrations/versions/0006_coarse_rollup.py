"""Coarse rollup level: ``layer_stat_coarse``, one row per (layer, block of 1,024 steps, rank).

The same columns as ``layer_stat_block`` (min/max/sum/count/NaN count of every float statistic,
pooled gradient moments); a heatmap of hundreds of layers over 100,000+ steps reads these.
Backfilled from the 64-step blocks already stored (16 per coarse block; the pooled moments
merged n-way around each coarse block's weighted mean). Downgrade drops the table.

Frozen here on purpose: the SQL below must not follow later changes of the spec.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-03 22:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATS = ("mean", "l2", "maxabs", "l2_post", "wnorm", "var", "std")


def upgrade() -> None:
    cols = [sa.Column('layer_id', sa.BigInteger(), nullable=False), sa.Column('block', sa.BigInteger(), nullable=False),
            sa.Column('rank', sa.Integer(), nullable=False), sa.Column('step_min', sa.BigInteger(), nullable=False),
            sa.Column('step_max', sa.BigInteger(), nullable=False), sa.Column('n', sa.Integer(), nullable=False)]
    for st in _STATS:
        cols += [sa.Column(f'{st}_min', sa.Double(), nullable=True), sa.Column(f'{st}_max', sa.Double(), nullable=True),
                 sa.Column(f'{st}_sum', sa.Double(), nullable=True), sa.Column(f'{st}_cnt', sa.Integer(), nullable=False),
                 sa.Column(f'{st}_nan', sa.Integer(), nullable=False)]
    cols += [sa.Column('mom_n', sa.BigInteger(), nullable=False), sa.Column('mom_mean', sa.Double(), nullable=True),
             sa.Column('mom_m2', sa.Double(), nullable=True), sa.Column('mom_skip', sa.Integer(), nullable=False)]
    op.create_table('layer_stat_coarse', *cols,
                    sa.PrimaryKeyConstraint('layer_id', 'block', 'rank', name=op.f('pk_layer_stat_coarse')),
                    sqlite_with_rowid=False)
    _backfill()


def _backfill() -> None:
    cols = ["layer_id", "block", "rank", "step_min", "step_max", "n", "mom_n", "mom_mean", "mom_m2", "mom_skip"]
    sel = ["layer_id", "block / 16", "rank", "min(step_min)", "max(step_max)", "sum(n)", "sum(mom_n)", "max(g.mu)",
           "CASE WHEN max(g.mu) IS NULL THEN NULL ELSE sum(CASE WHEN mom_n > 0 THEN mom_m2 + mom_n * "
           "(mom_mean - g.mu) * (mom_mean - g.mu) ELSE 0.0 END) END", "sum(mom_skip)"]
    for st in _STATS:
        cols += [f"{st}_min", f"{st}_max", f"{st}_sum", f"{st}_cnt", f"{st}_nan"]
        sel += [f"min({st}_min)", f"max({st}_max)", f"sum({st}_sum)", f"sum({st}_cnt)", f"sum({st}_nan)"]
    means = ("SELECT layer_id AS g_lid, block / 16 AS g_blk, rank AS g_rank, sum(mom_n * mom_mean) / "
             "CAST(sum(mom_n) AS DOUBLE PRECISION) AS mu FROM layer_stat_block WHERE mom_n > 0 "
             "GROUP BY layer_id, block / 16, rank")
    op.execute(f"INSERT INTO layer_stat_coarse ({', '.join(cols)}) SELECT {', '.join(sel)} FROM layer_stat_block "
               f"LEFT JOIN ({means}) g ON g.g_lid = layer_id AND g.g_blk = block / 16 AND g.g_rank = rank "
               "GROUP BY layer_id, block / 16, rank")


def downgrade() -> None:
    op.drop_table('layer_stat_coarse')
