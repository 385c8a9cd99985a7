"""Qt-free library of the USBEditor Slicer module: logic (MRML <-> USBLib), background worker, dependencies."""
