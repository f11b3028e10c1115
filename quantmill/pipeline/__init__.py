"""The release pipeline: plan a recipe as a DAG of keyed stages, run it resumably, export and publish."""
