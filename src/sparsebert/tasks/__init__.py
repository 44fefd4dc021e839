"""Tasks: data, label spaces, evaluation sets and metrics, behind one interface (`base.Task`).

Look a task up by name with `get_task`; a new task registers itself with `register_task`.
"""

from sparsebert.tasks.base import MODEL_KINDS, TASKS, EvalSet, Task, get_task, register_task

__all__ = ["MODEL_KINDS", "TASKS", "EvalSet", "Task", "get_task", "register_task"]
