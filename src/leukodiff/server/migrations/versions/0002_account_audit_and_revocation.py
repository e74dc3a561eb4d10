"""account events in the audit trail; sign-out revokes sessions

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 13:30:00

`audit_events.case_id` becomes nullable: account events (created, deactivated,
reactivated) belong to no case. `users.session_epoch` is stored in each session
cookie; signing out raises it, which ends every session of that user, copies of
the cookie included.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.alter_column('case_id', existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_epoch', sa.Integer(), nullable=False,
                                      server_default='0'))


def downgrade() -> None:
    # Not batch mode: on SQLite that copies `users`, and dropping the old copy breaks the
    # foreign keys that cases and fields hold on it. ALTER TABLE DROP COLUMN (SQLite >=
    # 3.35) changes the table in place.
    op.drop_column('users', 'session_epoch')
    op.execute("DELETE FROM audit_events WHERE case_id IS NULL")
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.alter_column('case_id', existing_type=sa.Integer(), nullable=False)
