"""plumbing -- what the seven design-card files at the top lean on: loading, checking, saving,
sharding, planning and reporting. Skip it on a first read; plumbing/README.md says which file
holds what."""
