"""What certyo_dagster writes into your MongoDB: the `certyo_*` fields, their statuses, and the
`_certyo_*` collections.

Every name the pipeline adds to a watched document or to its database is defined here and
nowhere else. The sanitizer leaves top-level `certyo_*` fields out of the payload sent to
Certyo, so writing them back never changes a document's record hash.
"""

from __future__ import annotations

FIELD_PREFIX = "certyo_"

# -- fields of a watched document ------------------------------------------------------------

STATUS = "certyo_status"  # one of STATUSES
VERSION = "certyo_version"  # the recordVersion (epoch ms of the timestamp field) last handled
RECORD_HASH = "certyo_record_hash"  # Certyo's hash of that version's record
INGESTED_AT = "certyo_ingested_at"  # when Certyo acknowledged that version
FAILURE_REASON = "certyo_failure_reason"  # `<code>: <detail>` of a rejected or failed version
# Written by verification once the version is anchored on chain.
VERIFIED_AT = "certyo_verified_at"
TX_HASH = "certyo_tx_hash"
MERKLE_ROOT = "certyo_merkle_root"
BLOCK_NUMBER = "certyo_block_number"
IPFS_CID = "certyo_ipfs_cid"

# Fields verification adds; a newly ingested version must not inherit them.
VERIFICATION_FIELDS = (VERIFIED_AT, TX_HASH, MERKLE_ROOT, BLOCK_NUMBER, IPFS_CID, FAILURE_REASON)

# -- values of certyo_status -----------------------------------------------------------------

PENDING = "pending"  # acknowledged by Certyo, not yet verified as anchored
ANCHORED = "anchored"  # verified: anchored on chain, proof checked
FAILED = "failed"  # verification failed; FAILURE_REASON says why
REJECTED = "rejected"  # never accepted (poison document or refused by Certyo): a dead letter
STATUSES = (PENDING, ANCHORED, FAILED, REJECTED)

# -- collections of our own, in the watched database -----------------------------------------

DEAD_LETTERS_COLLECTION = "_certyo_dead_letters"
CURSORS_COLLECTION = "_certyo_cursors"
