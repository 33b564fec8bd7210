"""accounts: keys, budgets and their usage, rate buckets, reservations, ledger, prices, instances

Revision ID: 0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('key_hint', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('owner', sa.String(length=200), server_default='', nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_ms', sa.BigInteger(), nullable=True),
    sa.Column('revoked_ms', sa.BigInteger(), nullable=True),
    sa.Column('allowed_models', sa.Text(), nullable=True),
    sa.Column('rpm_limit', sa.BigInteger(), nullable=True),
    sa.Column('tpm_limit', sa.BigInteger(), nullable=True),
    sa.Column('max_concurrent', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('instances',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_ms', sa.BigInteger(), nullable=False),
    sa.Column('heartbeat_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('prices',
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('prompt_micros_per_mtok', sa.BigInteger(), nullable=False),
    sa.Column('completion_micros_per_mtok', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('model')
    )
    op.create_table('budget_usage',
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('period', sa.String(length=8), nullable=False),
    sa.Column('unit', sa.String(length=8), nullable=False),
    sa.Column('span', sa.String(length=10), nullable=False),
    sa.Column('committed', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('reserved', sa.BigInteger(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('key_id', 'period', 'unit', 'span')
    )
    op.create_table('budgets',
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('period', sa.String(length=8), nullable=False),
    sa.Column('unit', sa.String(length=8), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('key_id', 'period', 'unit')
    )
    op.create_table('ledger',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('key_label', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('model_version', sa.String(length=32), server_default='', nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('outcome', sa.String(length=24), nullable=False),
    sa.Column('ttft_ms', sa.Integer(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('cost_micros', sa.BigInteger(), nullable=False),
    sa.Column('started_ms', sa.BigInteger(), nullable=False),
    sa.Column('ended_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('request_id')
    )
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_ended_ms'), ['ended_ms'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_key_id'), ['key_id'], unique=False)

    op.create_table('rate_buckets',
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('level_milli', sa.BigInteger(), nullable=False),
    sa.Column('updated_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('key_id', 'kind')
    )
    op.create_table('reservations',
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.String(length=36), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('key_label', sa.String(length=200), nullable=False),
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('micros', sa.BigInteger(), nullable=False),
    sa.Column('prompt_price', sa.BigInteger(), nullable=False),
    sa.Column('completion_price', sa.BigInteger(), nullable=False),
    sa.Column('windows', sa.Text(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('request_id')
    )
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reservations_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reservations_key_id'), ['key_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('reservations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reservations_key_id'))
        batch_op.drop_index(batch_op.f('ix_reservations_instance_id'))

    op.drop_table('reservations')
    op.drop_table('rate_buckets')
    with op.batch_alter_table('ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_key_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_ended_ms'))

    op.drop_table('ledger')
    op.drop_table('budgets')
    op.drop_table('budget_usage')
    op.drop_table('prices')
    op.drop_table('instances')
    op.drop_table('api_keys')
