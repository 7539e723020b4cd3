"""The WMS target: its connector (``connector``) and a reference WMS server (``server``)."""
