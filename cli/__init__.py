"""The layerdb command line."""
