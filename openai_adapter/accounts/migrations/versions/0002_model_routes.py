"""model routes: which version of a model takes traffic (llm-deploy)

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_routes',
    sa.Column('model', sa.String(length=256), nullable=False),
    sa.Column('serving_version', sa.Integer(), nullable=False),
    sa.Column('serving_since_ms', sa.BigInteger(), nullable=False),
    sa.Column('previous_version', sa.Integer(), nullable=True),
    sa.Column('canary_version', sa.Integer(), nullable=True),
    sa.Column('canary_percent', sa.Integer(), server_default='0', nullable=False),
    sa.Column('canary_since_ms', sa.BigInteger(), nullable=True),
    sa.Column('updated_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('model')
    )


def downgrade() -> None:
    op.drop_table('model_routes')
