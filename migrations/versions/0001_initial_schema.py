"""Initial schema: runs, layers, per-layer stats, step records, scalars, events, ingest bookkeeping.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 07:31:10.375153
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('layer_stat',
    sa.Column('layer_id', sa.BigInteger(), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('numel', sa.BigInteger(), nullable=True),
    sa.Column('mean', sa.Double(), nullable=True),
    sa.Column('var', sa.Double(), nullable=True),
    sa.Column('std', sa.Double(), nullable=True),
    sa.Column('l2', sa.Double(), nullable=True),
    sa.Column('maxabs', sa.Double(), nullable=True),
    sa.Column('nonfinite', sa.BigInteger(), nullable=True),
    sa.Column('l2_post', sa.Double(), nullable=True),
    sa.Column('nan_mask', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('layer_id', 'step', 'rank', name=op.f('pk_layer_stat')),
    sqlite_with_rowid=False
    )
    op.create_table('run',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('project', sa.String(length=512), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('config', sa.JSON(), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=True),
    sa.Column('notes', sa.Text(), nullable=True),
    sa.Column('world_size', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.Double(), nullable=True),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.Column('last_step', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_run'))
    )
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.create_index('ix_run_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_run_project_created_at', ['project', 'created_at'], unique=False)

    op.create_table('event',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('time', sa.Double(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_event_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_event'))
    )
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.create_index('ix_event_run_id_kind_step', ['run_id', 'kind', 'step'], unique=False)
        batch_op.create_index('ix_event_run_id_step', ['run_id', 'step'], unique=False)

    op.create_table('ingest_batch',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.Integer(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.Double(), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('step_min', sa.BigInteger(), nullable=True),
    sa.Column('step_max', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_ingest_batch_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'source', 'seq', name=op.f('pk_ingest_batch'))
    )
    op.create_table('ingest_cursor',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('source', sa.Integer(), nullable=False),
    sa.Column('acked', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_ingest_cursor_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'source', name=op.f('pk_ingest_cursor'))
    )
    op.create_table('layer',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('shape', sa.JSON(), nullable=True),
    sa.Column('dtype', sa.String(length=32), nullable=False),
    sa.Column('sparse', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_layer_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_layer')),
    sa.UniqueConstraint('run_id', 'idx', name=op.f('uq_layer_run_id_idx'))
    )
    with op.batch_alter_table('layer', schema=None) as batch_op:
        batch_op.create_index('ix_layer_run_id_name', ['run_id', 'name'], unique=False)

    op.create_table('scalar',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('time', sa.Double(), nullable=False),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('is_nan', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_scalar_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'key', 'step', 'rank', name=op.f('pk_scalar')),
    sqlite_with_rowid=False
    )
    op.create_table('step_record',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('time', sa.Double(), nullable=False),
    sa.Column('total_norm', sa.Double(), nullable=True),
    sa.Column('total_norm_post', sa.Double(), nullable=True),
    sa.Column('clip_coef', sa.Double(), nullable=True),
    sa.Column('loss_scale', sa.Double(), nullable=True),
    sa.Column('skipped', sa.Boolean(), nullable=False),
    sa.Column('nan_mask', sa.Integer(), nullable=False),
    sa.Column('transforms', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_step_record_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'step', 'rank', name=op.f('pk_step_record')),
    sqlite_with_rowid=False
    )


def downgrade() -> None:
    op.drop_table('step_record')
    op.drop_table('scalar')
    with op.batch_alter_table('layer', schema=None) as batch_op:
        batch_op.drop_index('ix_layer_run_id_name')

    op.drop_table('layer')
    op.drop_table('ingest_cursor')
    op.drop_table('ingest_batch')
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_index('ix_event_run_id_step')
        batch_op.drop_index('ix_event_run_id_kind_step')

    op.drop_table('event')
    with op.batch_alter_table('run', schema=None) as batch_op:
        batch_op.drop_index('ix_run_project_created_at')
        batch_op.drop_index('ix_run_created_at')

    op.drop_table('run')
    op.drop_table('layer_stat')
