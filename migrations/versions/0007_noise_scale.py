"""Gradient noise scale: ``step_record.noise_scale/noise_g2/noise_trace`` and the per-layer
``layer_stat.noise_scale`` with its rollup aggregates in ``layer_stat_block`` and ``layer_stat_coarse``.

All new values are nullable (not measured); rows stored before have nothing to backfill (the
rollup count and NaN count of a statistic nobody measured are 0). Downgrade drops the columns.

Frozen here on purpose: this must not follow later changes of the spec.

Revision ID: 0007n
Revises: 0006
Create Date: 2026-12-04 03:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007n'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STEP = ("noise_scale", "noise_g2", "noise_trace")
_ROLLUPS = ("layer_stat_block", "layer_stat_coarse")


def upgrade() -> None:
    with op.batch_alter_table('step_record', schema=None) as batch_op:
        for c in _STEP:
            batch_op.add_column(sa.Column(c, sa.Double(), nullable=True))
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.add_column(sa.Column('noise_scale', sa.Double(), nullable=True))
    for t in _ROLLUPS:
        with op.batch_alter_table(t, schema=None) as batch_op:
            for agg in ("min", "max", "sum"):
                batch_op.add_column(sa.Column(f'noise_scale_{agg}', sa.Double(), nullable=True))
            for agg in ("cnt", "nan"):
                batch_op.add_column(sa.Column(f'noise_scale_{agg}', sa.Integer(), nullable=False,
                                              server_default=sa.text('0')))
        # the models carry no server default: existing rows got their 0, new rows are written whole
        with op.batch_alter_table(t, schema=None) as batch_op:
            for agg in ("cnt", "nan"):
                batch_op.alter_column(f'noise_scale_{agg}', server_default=None)


def downgrade() -> None:
    for t in _ROLLUPS:
        with op.batch_alter_table(t, schema=None) as batch_op:
            for agg in ("min", "max", "sum", "cnt", "nan"):
                batch_op.drop_column(f'noise_scale_{agg}')
    with op.batch_alter_table('layer_stat', schema=None) as batch_op:
        batch_op.drop_column('noise_scale')
    with op.batch_alter_table('step_record', schema=None) as batch_op:
        for c in reversed(_STEP):
            batch_op.drop_column(c)
