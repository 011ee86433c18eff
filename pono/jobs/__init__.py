"""Jobs: post-call workflows and scheduled jobs, run by workers off the pgqueuer queue in Postgres."""
