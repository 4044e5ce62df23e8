"""Running model-audit as a service: Prefect deployments (schedules, registry-event triggers),
local server launchers and scale-out recipes. The embedded defaults need none of it: `make demo`
and `model-audit audit|correct` run the flows on Prefect's ephemeral server."""
