"""A third-party backend plugin used by the README example and the plugin tests: correct
float32 attention except that every query ignores its sequence's last key."""

from tests.planted import PlantedBackend

BACKEND = PlantedBackend("drop_last_key", name="DROP_LAST_KEY")


def make_backends():
    """A factory returning several backends also works as a plugin target."""
    return [PlantedBackend(None, name="PLUGIN_CORRECT"), PlantedBackend("scale_1.01", name="PLUGIN_SCALE")]
