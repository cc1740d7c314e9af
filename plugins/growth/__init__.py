"""Built-in growth plugins: function-preserving operators and schedules (work in progress)."""
