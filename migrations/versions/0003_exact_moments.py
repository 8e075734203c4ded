"""Exact moments: layer_stat stores m2 (centred second moment) instead of var/std, plus wnorm.

Existing rows convert: ``m2 = var · numel`` (as exact as the var they were stored with), their
NaN bits move to the new column order (mean, m2, l2, maxabs, l2_post, wnorm), ``wnorm`` is
NULL (not measured). The rollup is rebuilt from the converted rows: it keeps the derived var
and std beside the stored statistics, and each block's gradient moments pooled over its steps
(``mom_n``, ``mom_mean``, ``mom_m2``; finite rows, ``mom_skip`` counts the others). Downgrade
restores var/std from m2 (var = m2/numel).

Frozen here on purpose: the SQL below must not follow later changes of the spec.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 16:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VAR = "CASE WHEN numel > 0 THEN m2 / numel ELSE 0.0 END"
_STD = "CASE WHEN numel > 0 THEN sqrt(abs(m2) / numel) ELSE 0.0 END"
#: (stat, value expression, nan_mask bit) of the new rollup, in its column order.
_NEW = (("mean", "mean", 0), ("l2", "l2", 2), ("maxabs", "maxabs", 3), ("l2_post", "l2_post", 4),
        ("wnorm", "wnorm", 5), ("var", _VAR, 1), ("std", _STD, 1))
_OLD = (("mean", "mean", 0), ("var", "var", 1), ("std", "std", 2), ("l2", "l2", 3), ("maxabs", "maxabs", 4),
        ("l2_post", "l2_post", 5))


_FINITE = "(mean IS NOT NULL AND m2 IS NOT NULL AND mean BETWEEN -1.7e308 AND 1.7e308 AND m2 <= 1.7e308)"


def _block_table(stats: Sequence[str], pooled: bool) -> None:
    cols = [sa.Column('layer_id', sa.BigInteger(), nullable=False), sa.Column('block', sa.BigInteger(), nullable=False),
            sa.Column('rank', sa.Integer(), nullable=False), sa.Column('step_min', sa.BigInteger(), nullable=False),
            sa.Column('step_max', sa.BigInteger(), nullable=False), sa.Column('n', sa.Integer(), nullable=False)]
    if pooled:
        cols += [sa.Column('mom_n', sa.BigInteger(), nullable=False), sa.Column('mom_mean', sa.Double(), nullable=True),
                 sa.Column('mom_m2', sa.Double(), nullable=True), sa.Column('mom_skip', sa.Integer(), nullable=False)]
    for st in stats:
        cols += [sa.Column(f'{st}_min', sa.Double(), nullable=True), sa.Column(f'{st}_max', sa.Double(), nullable=True),
                 sa.Column(f'{st}_sum', sa.Double(), nullable=True), sa.Column(f'{st}_cnt', sa.Integer(), nullable=False),
                 sa.Column(f'{st}_nan', sa.Integer(), nullable=False)]
    op.create_table('layer_stat_block', *cols,
                    sa.PrimaryKeyConstraint('layer_id', 'block', 'rank', name=op.f('pk_layer_stat_block')),
                    sqlite_with_rowid=False)


def _backfill(stats: Sequence[tuple[str, str, int]], pooled: bool) -> None:
    cols = ["layer_id", "block", "rank", "step_min", "step_max", "n"]
    sel = ["layer_id", "step / 64", "rank", "min(step)", "max(step)", "count(*)"]
    join = ""
    if pooled:  # two passes around each block's weighted mean g.mu
        cols += ["mom_n", "mom_mean", "mom_m2", "mom_skip"]
        sel += [f"sum(CASE WHEN {_FINITE} THEN numel ELSE 0 END)", "max(g.mu)",
                f"CASE WHEN max(g.mu) IS NULL THEN NULL ELSE sum(CASE WHEN {_FINITE} THEN m2 + numel * (mean - g.mu) "
                "* (mean - g.mu) ELSE 0.0 END) END", f"sum(CASE WHEN {_FINITE} THEN 0 ELSE 1 END)"]
        join = ("LEFT JOIN (SELECT layer_id AS g_lid, step / 64 AS g_blk, rank AS g_rank, sum(numel * mean) / "
                f"sum(numel) AS mu FROM layer_stat WHERE {_FINITE} AND numel > 0 GROUP BY layer_id, step / 64, rank) g "
                "ON g.g_lid = layer_id AND g.g_blk = step / 64 AND g.g_rank = rank ")
    for st, v, bit in stats:
        cols += [f"{st}_min", f"{st}_max", f"{st}_sum", f"{st}_cnt", f"{st}_nan"]
        sel += [f"min({v})", f"max({v})", f"sum({v})", f"count({v})", f"sum((nan_mask / {1 << bit}) % 2)"]
    op.execute(f"INSERT INTO layer_stat_block ({', '.join(cols)}) SELECT {', '.join(sel)} FROM layer_stat "
               f"{join}GROUP BY layer_id, step / 64, rank")


def upgrade() -> None:
    op.drop_table('layer_stat_block')
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.add_column(sa.Column('m2', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('wnorm', sa.Double(), nullable=True))
    # old bits: mean 0, var 1, std 2, l2 3, maxabs 4, l2_post 5 -> mean 0, m2 1, l2 2, maxabs 3, l2_post 4
    op.execute("UPDATE layer_stat SET m2 = var * numel, "
               "nan_mask = (nan_mask % 4) + ((nan_mask / 8) % 8) * 4")
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.drop_column('var')
        batch_op.drop_column('std')
    _block_table([s for s, _, _ in _NEW], pooled=True)
    _backfill(_NEW, pooled=True)


def downgrade() -> None:
    op.drop_table('layer_stat_block')
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.add_column(sa.Column('var', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('std', sa.Double(), nullable=True))
    op.execute(f"UPDATE layer_stat SET var = {_VAR}, std = {_STD}, "
               "nan_mask = (nan_mask % 2) + ((nan_mask / 2) % 2) * 6 + ((nan_mask / 4) % 8) * 8")
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.drop_column('m2')
        batch_op.drop_column('wnorm')
    _block_table([s for s, _, _ in _OLD], pooled=False)
    _backfill(_OLD, pooled=False)
