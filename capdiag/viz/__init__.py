"""Finding -> matplotlib Figure. No pyplot global state; matplotlib imported lazily."""
