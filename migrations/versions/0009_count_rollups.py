"""The counts enter the rollup: both rollup levels gain min/max/sum/count/NaN count of
``nonfinite``, ``zeros`` and ``underflow``, so a heatmap or series of them over a long run
reads blocks instead of every row.

Existing blocks are backfilled from the stored rows (a count is never NaN: its NaN count is 0;
``zeros`` and ``underflow`` are NULL where not measured, which the count leaves out).
Downgrade drops the columns.

Frozen here on purpose: the names below must not follow later changes of the spec.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 15:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("nonfinite", "zeros", "underflow")
_LEVELS = (("layer_stat_block", 64), ("layer_stat_coarse", 1024))


def _backfill(table: str, steps: int) -> str:
    aggs = [(f"{st}_{agg}", f"{fn}({st})") for st in _COUNTS
            for agg, fn in (("min", "min"), ("max", "max"), ("sum", "sum"), ("cnt", "count"))]
    inner = ", ".join(f"{expr} AS {name}" for name, expr in aggs)
    sets = ", ".join(f"{name} = s.{name}" for name, _ in aggs)
    return (f"UPDATE {table} SET {sets} FROM (SELECT layer_id AS s_lid, step / {steps} AS s_blk, rank AS s_rank, "
            f"{inner} FROM layer_stat GROUP BY layer_id, step / {steps}, rank) s "
            f"WHERE {table}.layer_id = s.s_lid AND {table}.block = s.s_blk AND {table}.rank = s.s_rank")


def upgrade() -> None:
    for table, steps in _LEVELS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for st in _COUNTS:
                for agg in ("min", "max", "sum"):
                    batch_op.add_column(sa.Column(f'{st}_{agg}', sa.Double(), nullable=True))
                for agg in ("cnt", "nan"):
                    batch_op.add_column(sa.Column(f'{st}_{agg}', sa.Integer(), nullable=False, server_default='0'))
        op.execute(_backfill(table, steps))


def downgrade() -> None:
    for table, _ in _LEVELS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for st in _COUNTS:
                for agg in ("min", "max", "sum", "cnt", "nan"):
                    batch_op.drop_column(f'{st}_{agg}')
