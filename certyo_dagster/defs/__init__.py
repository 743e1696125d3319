"""The dg definitions folder: each subfolder's `defs.yaml` declares one component, e.g. a
`certyo_dagster.CertyoCollection` (`dg scaffold defs certyo_dagster.CertyoCollection <name>`)."""
