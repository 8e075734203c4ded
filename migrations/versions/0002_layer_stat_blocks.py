"""Rollup of layer stats per block of 64 steps (min/max/sum/count/NaN count per float stat).

Backfills the blocks of rows stored before this revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 08:02:40.527823
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('layer_stat_block',
    sa.Column('layer_id', sa.BigInteger(), nullable=False),
    sa.Column('block', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('step_min', sa.BigInteger(), nullable=False),
    sa.Column('step_max', sa.BigInteger(), nullable=False),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('mean_min', sa.Double(), nullable=True),
    sa.Column('mean_max', sa.Double(), nullable=True),
    sa.Column('mean_sum', sa.Double(), nullable=True),
    sa.Column('mean_cnt', sa.Integer(), nullable=False),
    sa.Column('mean_nan', sa.Integer(), nullable=False),
    sa.Column('var_min', sa.Double(), nullable=True),
    sa.Column('var_max', sa.Double(), nullable=True),
    sa.Column('var_sum', sa.Double(), nullable=True),
    sa.Column('var_cnt', sa.Integer(), nullable=False),
    sa.Column('var_nan', sa.Integer(), nullable=False),
    sa.Column('std_min', sa.Double(), nullable=True),
    sa.Column('std_max', sa.Double(), nullable=True),
    sa.Column('std_sum', sa.Double(), nullable=True),
    sa.Column('std_cnt', sa.Integer(), nullable=False),
    sa.Column('std_nan', sa.Integer(), nullable=False),
    sa.Column('l2_min', sa.Double(), nullable=True),
    sa.Column('l2_max', sa.Double(), nullable=True),
    sa.Column('l2_sum', sa.Double(), nullable=True),
    sa.Column('l2_cnt', sa.Integer(), nullable=False),
    sa.Column('l2_nan', sa.Integer(), nullable=False),
    sa.Column('maxabs_min', sa.Double(), nullable=True),
    sa.Column('maxabs_max', sa.Double(), nullable=True),
    sa.Column('maxabs_sum', sa.Double(), nullable=True),
    sa.Column('maxabs_cnt', sa.Integer(), nullable=False),
    sa.Column('maxabs_nan', sa.Integer(), nullable=False),
    sa.Column('l2_post_min', sa.Double(), nullable=True),
    sa.Column('l2_post_max', sa.Double(), nullable=True),
    sa.Column('l2_post_sum', sa.Double(), nullable=True),
    sa.Column('l2_post_cnt', sa.Integer(), nullable=False),
    sa.Column('l2_post_nan', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('layer_id', 'block', 'rank', name=op.f('pk_layer_stat_block')),
    sqlite_with_rowid=False
    )


    _backfill()


_STATS = ("mean", "var", "std", "l2", "maxabs", "l2_post")


def _backfill() -> None:
    cols = ["layer_id", "block", "rank", "step_min", "step_max", "n"]
    sel = ["layer_id", "step / 64", "rank", "min(step)", "max(step)", "count(*)"]
    for bit, st in enumerate(_STATS):
        cols += [f"{st}_min", f"{st}_max", f"{st}_sum", f"{st}_cnt", f"{st}_nan"]
        sel += [f"min({st})", f"max({st})", f"sum({st})", f"count({st})", f"sum((nan_mask / {1 << bit}) % 2)"]
    op.execute(f"INSERT INTO layer_stat_block ({', '.join(cols)}) SELECT {', '.join(sel)} FROM layer_stat "
               "GROUP BY layer_id, step / 64, rank")


def downgrade() -> None:
    op.drop_table('layer_stat_block')
