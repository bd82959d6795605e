"""Integrations with other trainers. ``sstoken.integrations.trl``: TRL's ``SFTTrainer`` with
sstoken's token selection (needs ``pip install 'sstoken[trl]'``)."""
