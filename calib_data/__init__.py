"""quantmill.calib_data"""
