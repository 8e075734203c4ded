"""Loss-scale headroom and optimizer-aware signals: ``layer_stat`` gains ``zeros``, ``headroom``,
``underflow``, ``mom_cos`` and ``upd_ratio``; both rollup levels gain min/max/sum/count/NaN count
of the float ones (``headroom``, ``mom_cos``, ``upd_ratio``).

Rows stored before this revision did not measure them: their new columns are NULL without a
``nan_mask`` bit (the new float fields take the next free bits, 7 to 9, which no earlier row
sets), and their rollup rows count 0 values. Nothing to backfill. Downgrade drops the columns.

Frozen here on purpose: the names below must not follow later changes of the spec.

Revision ID: 0008
Revises: 0007n
Create Date: 2026-12-04 03:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007n'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LAYER = (("zeros", sa.BigInteger), ("headroom", sa.Double), ("underflow", sa.BigInteger), ("mom_cos", sa.Double),
          ("upd_ratio", sa.Double))
_ROLLUP = ("headroom", "mom_cos", "upd_ratio")
_TABLES = ("layer_stat_block", "layer_stat_coarse")


def upgrade() -> None:
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        for name, typ in _LAYER:
            batch_op.add_column(sa.Column(name, typ(), nullable=True))
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for st in _ROLLUP:
                for agg in ("min", "max", "sum"):
                    batch_op.add_column(sa.Column(f'{st}_{agg}', sa.Double(), nullable=True))
                for agg in ("cnt", "nan"):
                    batch_op.add_column(sa.Column(f'{st}_{agg}', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            for st in _ROLLUP:
                for agg in ("min", "max", "sum", "cnt", "nan"):
                    batch_op.drop_column(f'{st}_{agg}')
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        for name, _ in _LAYER:
            batch_op.drop_column(name)
