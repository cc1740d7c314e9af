"""Process groups, devices and device meshes."""
