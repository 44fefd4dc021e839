"""Tasks: data, label spaces and metrics."""

from sparsebert.tasks.glue import GLUE_TASKS, GlueTask, get_task, load_split

__all__ = ["GLUE_TASKS", "GlueTask", "get_task", "load_split"]
