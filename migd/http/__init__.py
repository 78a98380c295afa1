"""migd's HTTP endpoint: Prometheus metrics, health, the migration as JSON and a live dashboard."""
