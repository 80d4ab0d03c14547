"""The one error a training run raises for a problem the user can fix."""


class TrainError(RuntimeError):
  """A run that cannot go on; the message names the problem and the fix."""
